"""`gradientspace run CONFIG` and the stage-by-stage commands: the stages in order, each skipping itself when done.

cluster (data → warm-up → gradients + sketch → clusters) → the generalist, then the experts of
every strategy (branched from it, kept or fallen back on validation) → routers → router
thresholds chosen on validation → ELREA centroids (when the ensemble is evaluated) → evaluation →
report. `run_until(config, "experts")` runs the stages up to and including one, so
`train-experts`, `train-router` and `evaluate` bring their prerequisites up to date first (a
finished stage costs one line). Every check that can fail cheaply (`preflight`) runs before the
first stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from . import distributed
from .config import RunConfig
from .data import fingerprint
from .evaluate import evaluate_strategies
from .experts import strategy_dir, train_experts, trained_strategies
from .data import validation_ids
from .inference import ROUTED_STRATEGIES, calibrate_threshold, compute_elrea_centroids, router_dir
from .pipeline import cluster, cluster_inputs, load_data, warmup_key
from .preflight import preflight
from .report import make_report
from .router import train_routers
from .runs import Run, config_hash, new_command, note

STEPS = ("cluster", "experts", "router", "evaluate", "report")


def elrea_centroids(config: RunConfig) -> str:
    """The ensemble's per-cluster mean gradients; returns the stage key (an input of evaluation)."""
    run = Run(config.out)
    inputs = {"warm-up": warmup_key(config), "clusters": config_hash(cluster_inputs(config)),
              "generalist": str(run.stage_entry("experts/single/0").get("key"))}
    key = config_hash(inputs)
    if run.is_done("elrea-centroids", key, inputs):
        return key
    records = load_data(run, config)
    with run.stage("elrea-centroids", key, inputs) as stage:
        compute_elrea_centroids(config, records)
        stage["outputs"] = ["elrea/centroids.safetensors"]
    return key


def router_thresholds(config: RunConfig, strategies: list[str] | None = None) -> dict:
    """`router.threshold: auto`: pick each router's threshold on the validation split (after its experts' fall-backs)."""
    run = Run(config.out)
    if config.router.threshold != "auto":
        return {}
    records = None
    chosen = {}
    for strategy in [s for s in strategies or config.experts.strategies if s in ROUTED_STRATEGIES]:
        stage = f"threshold/{strategy}"
        partition = strategy_dir(run, strategy) / "partition.json"
        key = config_hash(run.stage_entry(f"router/{strategy}").get("key"), partition.read_text(),
                          run.stage_entry("experts/single/0").get("key"), config.data.validation_fraction)
        if not run.is_done(stage, key):
            records = records or load_data(run, config)
            held = validation_ids(records, config.data.validation_fraction, config.seed)
            validation = [r for r in records if r.id in held]
            if not validation:
                continue
            with run.stage(stage, key) as entry:
                entry.update(calibrate_threshold(config, strategy, validation))
                entry["outputs"] = [str((router_dir(run, strategy) / "router.json").relative_to(run.root))]
        chosen[strategy] = run.stage_entry(stage).get("threshold")
    return chosen


def evaluate_inputs(run: Run, config: RunConfig, strategies: list[str], centroids_key: str | None) -> dict[str, str]:
    """What the evaluation reads: its settings, the test data's content, and every adapter, router and centroid it serves with."""
    adapters = {}
    for strategy in trained_strategies(strategies):
        groups = json.loads((strategy_dir(run, strategy) / "partition.json").read_text())["groups"]
        adapters[strategy] = [run.stage_entry(f"experts/{strategy}/{g}").get("key") for g in groups]
    routers = {s: [run.stage_entry(f"{stage}/{s}").get("key") for stage in ("router", "threshold")]
               for s in trained_strategies(strategies) if s in ROUTED_STRATEGIES}
    return {"strategies": config_hash(strategies), "test data": fingerprint(config.evaluate.data),
            "evaluation settings": config_hash(asdict(config.evaluate), asdict(config.router), config.seed),
            "model": config_hash(asdict(config.model)), "adapters": config_hash(adapters), "routers": config_hash(routers),
            "elrea centroids": str(centroids_key)}


def evaluate_stage(config: RunConfig, strategies: list[str]) -> dict:
    run = Run(config.out)
    centroids_key = elrea_centroids(config) if "elrea-ensemble" in strategies else None
    inputs = evaluate_inputs(run, config, strategies, centroids_key)
    key = config_hash(inputs)
    if run.is_done("evaluate", key, inputs):
        return json.loads(run.path("eval.json").read_text())
    with Run(config.out).stage("evaluate", key, inputs) as stage:
        results = evaluate_strategies(config, strategies)
        stage["outputs"] = ["eval.json", "eval.md"]
    return results


def run_until(config: RunConfig, last: str = "report", strategies: list[str] | None = None, overwrite: bool = False) -> dict:
    """Check everything cheap first, then run every stage up to `last` (one of STEPS), skipping finished ones.

    Under torchrun every rank takes its shard of the gradient pass; the later stages run on rank 0.
    """
    new_command()
    wanted = list(strategies or config.experts.strategies)
    preflight(config, evaluate=STEPS.index(last) >= STEPS.index("evaluate"), overwrite=overwrite)
    result: dict = {"cluster": cluster(config)}
    if last == "cluster" or not distributed.is_main():
        return result
    result["experts"] = train_experts(config, trained_strategies(wanted))
    if last == "experts":
        return result
    result["router"] = train_routers(config, trained_strategies(wanted))
    result["thresholds"] = router_thresholds(config, wanted)
    if last == "router":
        return result
    result["eval"] = evaluate_stage(config, wanted)
    if last == "evaluate":
        return result
    note("run report: figures and report.html are redrawn every time")
    with Run(config.out).stage("report", "always") as stage:
        figures = make_report(config.out)
        stage["outputs"] = [str(f.relative_to(Run(config.out).root)) for f in figures]
    result["figures"] = figures
    return result


def run_all(config: RunConfig, overwrite: bool = False) -> dict:
    """`gradientspace run CONFIG`: every stage."""
    return run_until(config, "report", overwrite=overwrite)
