"""`gradientspace run CONFIG`: every stage in order, each skipping itself when already done.

cluster (data → warm-up → gradients + sketch → clusters) → the generalist, then the experts of
every strategy (branched from it, kept or fallen back on validation) → routers → router
thresholds chosen on validation → ELREA centroids (when the ensemble is evaluated) → evaluation →
report.
"""

from __future__ import annotations

from dataclasses import asdict

from .config import RunConfig
from .evaluate import evaluate_strategies
from .experts import strategy_dir, train_experts
from .data import validation_ids
from .inference import ROUTED_STRATEGIES, calibrate_threshold, compute_elrea_centroids, router_dir
from .pipeline import cluster, load_data, warmup_key
from .report import make_report
from .router import train_routers
from .runs import Run, config_hash


def elrea_centroids(config: RunConfig) -> None:
    run = Run(config.out)
    key = config_hash(warmup_key(config), run.stage_entry("cluster").get("key"), run.stage_entry("experts/single/0").get("key"))
    if run.is_done("elrea-centroids", key):
        return
    records = load_data(run, config)
    with run.stage("elrea-centroids", key) as stage:
        compute_elrea_centroids(config, records)
        stage["outputs"] = ["elrea/centroids.safetensors"]


def router_thresholds(config: RunConfig) -> dict:
    """`router.threshold: auto`: pick each router's threshold on the validation split (after its experts' fall-backs)."""
    run = Run(config.out)
    if config.router.threshold != "auto":
        return {}
    records = None
    chosen = {}
    for strategy in [s for s in config.experts.strategies if s in ROUTED_STRATEGIES]:
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


def run_all(config: RunConfig) -> dict:
    outcome = cluster(config)
    train_experts(config)
    train_routers(config)
    router_thresholds(config)
    if "elrea-ensemble" in config.experts.strategies:
        elrea_centroids(config)
    run = Run(config.out)
    key = config_hash(asdict(config.evaluate), {s: run.stage_entry(s).get("key") for s in run.manifest["stages"] if s.startswith(("experts/", "router/", "threshold/"))})
    if run.is_done("evaluate", key):
        import json

        results = json.loads(run.path("eval.json").read_text())
    else:
        with run.stage("evaluate", key) as stage:
            results = evaluate_strategies(config)
            stage["outputs"] = ["eval.json", "eval.md"]
    with Run(config.out).stage("report", "always") as stage:
        figures = make_report(config.out)
        stage["outputs"] = [str(f.relative_to(Run(config.out).root)) for f in figures]
    return {"cluster": outcome, "eval": results, "figures": figures}
