"""What a newcomer reads: every option's help (the config's own text where a flag sets a key), the
`config-keys` listing, `generate`'s output, and ordinary commands without library warnings."""

import argparse
import warnings

import pytest
from conftest import opened_run

from gradientspace.cli import build_parser, main
from gradientspace.config import config_keys, key_default, key_help, load_config
from gradientspace.experts.adapters import served_groups

pytestmark = pytest.mark.heavy(seconds=15)  # one whole `run` through the CLI


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    missing = [
        (name, action.option_strings or action.dest)
        for name, command in {"gradientspace": parser, **subcommands(parser)}.items()
        for action in command._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert not missing, missing


@pytest.mark.parametrize(
    "command, flag, key",
    [
        ("cluster", "--max-length", "data.max_length"),
        ("cluster", "--seed", "seed"),
        ("cluster", "--limit", "data.limit"),
        ("cluster", "--skip-bad", "data.skip_bad"),
        ("train-experts", "--epochs", "experts.epochs"),
        ("evaluate", "--limit", "evaluate.limit"),
        ("generate", "--threshold", "router.threshold"),
        ("serve", "--port", "serve.port"),
        ("run", "--out", "out"),
    ],
)
def test_a_flag_that_sets_a_config_key_shows_that_keys_help_and_default(command, flag, key):
    (action,) = [a for a in subcommands(build_parser())[command]._actions if flag in a.option_strings]
    assert key_help(key).replace("%", "%%") in action.help
    assert f"[config key {key}, default {key_default(key)}]" in action.help


def test_generate_help_says_what_expert_minus_one_means(capsys):
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "-1 means" in text
        and "the fall-back" in text
        and "`expert_not_served`: the cluster's expert was not kept" in text
    )


def test_config_keys_lists_every_key_with_its_default_and_help(capsys):
    assert main(["config-keys"]) == 0
    out = capsys.readouterr().out
    listed = {
        line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in out.splitlines() if line and not line.startswith(" ")
    }
    keys = [key for key, _ in config_keys()]
    assert list(listed) == keys and len(keys) > 60
    assert all(listed[key] == key_default(key) for key in keys)
    folded = " ".join(out.split())
    for key in keys:
        assert " ".join(key_help(key).split()) in folded, key
    # every default shown is one the config accepts back, as `--set KEY=VALUE`
    defaults = load_config(None).to_dict()
    config = load_config(None, {key: listed[key] for key in keys})
    assert config.to_dict() == defaults


@pytest.fixture(scope="module")
def quiet_run(served_tiny_run, tmp_path_factory):
    """The shared tiny run (whose build kept its warnings and stderr), then `generate` and `report` on a copy of it,
    recording every warning and what went to stderr: what a user sees from a whole `run` and the commands after it."""
    import contextlib
    import io
    import json

    from conftest import copied_run

    run = copied_run(served_tiny_run, tmp_path_factory.mktemp("quiet"))
    built = json.loads((served_tiny_run.parent / "build-warnings.json").read_text())
    stderr = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
        warnings.simplefilter("default")  # what a user's shell shows: each warning once per place
        codes = [
            main(["generate", str(run), "--prompt", "What is 2 + 3?", "--max-new-tokens", "2"]),
            main(["report", str(run)]),
        ]
    shown = built["warnings"] + [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    return run, codes, shown, built["stderr"] + stderr.getvalue()


def test_ordinary_commands_print_no_library_warning(quiet_run):
    _, codes, shown, stderr = quiet_run
    assert codes == [0, 0]
    assert not shown, shown
    assert "Warning" not in stderr


def test_the_scoring_pass_shows_a_progress_bar_and_scores_as_one_call(quiet_run):
    from gradientspace.config import config_from_run
    from gradientspace.data.loading import load_records
    from gradientspace.evaluation.evaluate import scored
    from gradientspace.routing.model import StrategyModel

    run, _, _, stderr = quiet_run
    assert (
        "score matrix (validation)" in stderr and "score matrix (test)" in stderr
    )  # every adapter on every record, once
    config = config_from_run(run)
    records, _ = load_records(config.evaluate.data, per_source=config.data.per_source, seed=config.seed)
    engine = StrategyModel(config, ["routed"])
    choices, _ = engine.choose("routed", records)
    assert len({c.single_adapter for c in choices}) >= 2 and len(records) > 8  # several adapters, several batches
    assert scored(engine, "routed", choices, records, progress=False) == engine.nll_for_choices(choices, records)


def test_report_of_a_real_run_has_the_new_sections(quiet_run):
    run = quiet_run[0]
    page = (run / "report.html").read_text()
    for heading in ("<h2>Clustering</h2>", "<h2>Routing</h2>", "Scored on <code>mix4-packaged:test</code>"):
        assert heading in page
    fallback = [g for g, (path, _) in served_groups(opened_run(run), "routed").items() if path is None]
    for k in fallback:
        assert f"Served by expert <code>experts/{k}/</code>" not in page
