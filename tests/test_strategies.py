"""The strategy registry is the one place a strategy is defined: config, CLI, training, routing and evaluation read it."""

import json

import pytest
from conftest import tiny_run_config

from gradientspace.cli import main
from gradientspace.commands import run_all
from gradientspace.config import ConfigError, load_config
from gradientspace.experts import strategies
from gradientspace.experts.strategies import STRATEGIES, RoutedPartition, get, routed, trained


class AlternatingGroups(RoutedPartition):
    """A strategy the package does not ship: records alternate between two groups."""

    name, help = "alternating", "records alternate between two groups (a test strategy)"

    def labels(self, run, config, records):
        return [i % 2 for i in range(len(records))]


def test_what_each_strategy_needs_trained():
    config = load_config(None, {})
    # the generalist first (experts branch from it), then the single adapter of record they fall back to
    assert trained(["routed"], config) == ["single", "single-continued", "routed"]
    assert trained(["single"], config) == ["single"]  # nothing falls back
    assert trained(["gradient-oracle", "elrea-ensemble"], config) == [
        "single",
        "single-continued",
        "routed",
    ]  # they serve routed's experts
    assert routed(["single", "oracle", "gradient-oracle", "random-clusters"], config) == ["routed", "random-clusters"]
    as_before = load_config(None, {"experts.fallback": "generalist"})
    assert trained(["routed"], as_before) == ["single", "routed"]
    # nothing is decided on validation, so nothing could choose the continued generalist over the generalist
    for undecided in (
        {"experts.keep": "all"},
        {"experts.init": "warmup"},
        {"experts.equal_budget": True},
        {"data.validation_fraction": 0},
    ):
        assert trained(["routed"], load_config(None, undecided)) == ["single", "routed"], undecided
    assert [n for n, s in STRATEGIES.items() if s.owner != n] == ["gradient-oracle", "elrea-ensemble"]
    with pytest.raises(ValueError, match="unknown strategy `nope`"):
        get("nope")


def test_the_gradient_oracle_asks_for_the_gradient_pass_whatever_the_clusters_are_made_of(tmp_path):
    """It routes by gradients on the sketch basis: at the default `cluster.method` (embedding), which needs no gradient
    pass, serving it still builds the sketch (and the warm-up it is taken at); routed alone does not."""
    from gradientspace.routing.pipeline import serving_stages
    from gradientspace.runner import Run

    run = Run(load_config(None, {"out": str(tmp_path / "run"), "experts.strategies": ["routed", "gradient-oracle"]}))
    names = lambda strategy: {stage.name for stage in serving_stages(run, strategy)}
    assert {"cluster", "gradients"} <= names("gradient-oracle") and "gradients" not in names("routed")
    (gradients,) = [stage for stage in serving_stages(run, "gradient-oracle") if stage.name == "gradients"]
    assert [stage.name for stage in gradients.requires(run)] == ["warmup"]


def test_config_and_cli_accept_exactly_the_registry(tmp_path, capsys):
    for name in STRATEGIES:
        assert load_config(None, {"experts.strategies": [name]}).experts.strategies == [name]
    with pytest.raises(ConfigError, match="`experts.strategies`: 'alternating' is not one of routed, single"):
        load_config(None, {"experts.strategies": ["alternating"]})
    assert main(["evaluate", str(tmp_path / "none"), "--strategies", "alternating"]) != 0
    assert "--strategies: 'alternating' is not a strategy" in capsys.readouterr().err


@pytest.mark.heavy(seconds=20)
def test_a_strategy_added_to_the_registry_runs_end_to_end(served_tiny_run, tmp_path, monkeypatch):
    """Added to a copy of a finished run (its clustering and generalist are reused): partitioned, trained, routed, kept,
    thresholded and evaluated like a shipped strategy."""
    from conftest import copied_run

    monkeypatch.setitem(strategies.STRATEGIES, AlternatingGroups.name, AlternatingGroups())
    copied_run(served_tiny_run, tmp_path)
    result = run_all(load_config(tiny_run_config(tmp_path, ["single", "alternating"], experts="keep: all")))
    partition = json.loads((tmp_path / "run" / "strategies" / "alternating" / "partition.json").read_text())
    assert partition["groups"] == ["0", "1"]
    assert (
        tmp_path / "run" / "strategies" / "alternating" / "router" / "router.json"
    ).exists()  # routed: it got its own router
    assert "alternating" in result["thresholds"]  # and its threshold chosen on validation
    assert result["eval"]["alternating"]["overall"]["nll"] > 0
    served = set(result["eval"]["per_record"]["alternating"]["adapter"])
    assert served <= {"alternating__0", "alternating__1", "single__0"} and served


def test_no_module_outside_the_registry_names_a_strategy():
    """Behaviour lives on the strategy objects: a strategy's name as a string literal anywhere else in the package would be a
    branch on it (the registry's constants, `GENERALIST` and `ROUTED`, name the two the pipeline is built around)."""
    import ast
    from pathlib import Path

    import gradientspace

    package = Path(gradientspace.__file__).parent
    named = []
    for path in sorted(package.rglob("*.py")):
        if path == Path(strategies.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in STRATEGIES:
                named.append(f"{path.relative_to(package)}:{node.lineno} {node.value!r}")
    assert not named, named
