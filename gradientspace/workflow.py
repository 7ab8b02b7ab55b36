"""`gradientspace run CONFIG`: every stage in order, each skipping itself when already done.

cluster (data → warm-up → gradients + sketch → clusters) → experts of every strategy →
routers → ELREA centroids (when the ensemble is evaluated) → evaluation → report.
"""

from __future__ import annotations

from dataclasses import asdict

from .config import RunConfig
from .evaluate import evaluate_strategies
from .experts import train_experts
from .inference import compute_elrea_centroids
from .pipeline import cluster, load_data, warmup_key
from .report import make_report
from .router import train_routers
from .runs import Run, config_hash


def elrea_centroids(config: RunConfig) -> None:
    run = Run(config.out)
    key = config_hash(warmup_key(config), run.stage_entry("cluster").get("key"))
    if run.is_done("elrea-centroids", key):
        return
    records = load_data(run, config)
    with run.stage("elrea-centroids", key) as stage:
        compute_elrea_centroids(config, records)
        stage["outputs"] = ["elrea/centroids.safetensors"]


def run_all(config: RunConfig) -> dict:
    outcome = cluster(config)
    train_experts(config)
    train_routers(config)
    if "elrea-ensemble" in config.experts.strategies:
        elrea_centroids(config)
    run = Run(config.out)
    key = config_hash(asdict(config.evaluate), {s: run.stage_entry(s).get("key") for s in run.manifest["stages"] if s.startswith(("experts/", "router/"))})
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
