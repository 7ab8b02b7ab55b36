"""The experts protocol: equal tokens in equal-budget mode, fall-back to the generalist, the validation-chosen threshold."""

import random

import pytest
from conftest import write_records

from gradientspace import cluster, load_config
from gradientspace.data.loading import load_records
from gradientspace.data.records import validation_ids
from gradientspace.experts.adapters import decided, train_experts
from gradientspace.routing.model import StrategyModel
from gradientspace.routing.threshold import best_threshold

pytestmark = pytest.mark.heavy(seconds=40)  # a clustered run shared by the file, experts trained twice


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    data = root / "train.jsonl"
    write_records(data, 36)
    return data, root


def config_for(data, out, **overrides):
    base = {
        "model.name": "tiny-random",
        "model.lora_rank": 2,
        "data.path": str(data),
        "data.max_length": 64,
        "out": str(out),
        "sketch.rank": 4,
        "cluster.k": 3,
        "gradients.batch_size": 4,
        "warmup.fraction": 0.25,
        "data.validation_fraction": 0.25,
        "experts.batch_size": 4,
        "experts.epochs": 2,
        "experts.branch_epochs": 2,
    }
    base.update(overrides)
    return load_config(None, base)


def test_equal_budget_experts_see_the_same_tokens_as_the_single_adapter(clustered):
    data, root = clustered
    config = config_for(
        data,
        root / "equal",
        **{"experts.equal_budget": True, "experts.strategies": ["routed", "single", "random-clusters"]},
    )
    cluster(config)
    summaries = train_experts(config)
    single = summaries["single"]["experts"]["0"]
    assert single["epochs_run"] == 2 and single["tokens"] > 0
    for strategy in ("routed", "random-clusters"):
        experts = summaries[strategy]["experts"].values()
        assert sum(e["tokens"] for e in experts) == single["tokens"]  # the groups partition the same training part
        assert all(e["epochs_run"] == 2 for e in experts) and not summaries[strategy]["empty"]
        assert not decided(config, strategy)  # fixed-budget adapters are served as trained: no keep-or-fall-back
    records, _ = load_records(str(data))
    held = validation_ids(records, 0.25, config.seed)
    assert single["samples"] == len(records) - len(held) and single["validation_samples"] == len(held)


def test_an_expert_that_cannot_show_a_gain_on_its_routed_records_falls_back_to_the_generalist(clustered):
    """No expert serves enough validation records to pass the keep rule: every group is served by the generalist."""
    data, root = clustered
    config = config_for(
        data,
        root / "fallback",
        **{"experts.strategies": ["routed", "single"], "router.threshold": 0.0, "experts.keep_min_records": 1000},
    )
    cluster(config)
    summaries = train_experts(config)
    for expert in summaries["routed"]["experts"].values():
        # the branch started where the generalist ended: its initial validation NLL is the generalist's on that group
        assert expert["initial_eval_loss"] is not None and expert["best_eval_loss"] is not None
    from gradientspace.commands import decide_experts
    from gradientspace.routing.router import train_routers

    train_routers(config)
    decisions = decide_experts(config)["routed"]
    assert all(d["lambda"] == 0 and "keep_min_records" in d["reason"] for d in decisions.values())
    records, _ = load_records(str(data))
    engine = StrategyModel(config, ["routed", "single"])
    choices, _ = engine.choose("routed", records)
    assert {c.single_adapter for c in choices} == {engine.generalist}
    assert engine.nll("routed", records) == pytest.approx(engine.nll("single", records))


def test_best_threshold_matches_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 12)
        top = [rng.random() for _ in range(n)]
        expert = [rng.random() * 3 for _ in range(n)]
        generalist = [rng.random() * 3 for _ in range(n)]
        threshold, value = best_threshold(top, expert, generalist)
        grid = [i / 1000 for i in range(1002)]
        brute = min(sum(e if p >= t else g for p, e, g in zip(top, expert, generalist)) / n for t in grid)
        assert value == pytest.approx(brute, abs=1e-9)
        chosen = sum(e if p >= threshold else g for p, e, g in zip(top, expert, generalist)) / n
        assert chosen == pytest.approx(value, abs=1e-9)
    assert best_threshold([0.9, 0.8], [1.0, 1.0], [2.0, 2.0])[0] == 0.0  # experts always better: trust the router
    assert best_threshold([0.9, 0.8], [3.0, 3.0], [2.0, 2.0])[0] > 0.9  # generalist always better: never route
