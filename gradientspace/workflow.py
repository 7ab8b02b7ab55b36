"""`gradientspace run CONFIG` and the stage-by-stage commands: the stages in order, each skipping itself when done.

cluster (data → warm-up → gradients + sketch → clusters) → experts of every strategy →
routers → ELREA centroids (when the ensemble is evaluated) → evaluation → report.
`run_until(config, "experts")` runs the stages up to and including one, so `train-experts`,
`train-router` and `evaluate` bring their prerequisites up to date first (a finished stage costs
one line). Every check that can fail cheaply (`preflight`) runs before the first stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from . import distributed
from .config import RunConfig
from .data import fingerprint
from .evaluate import evaluate_strategies
from .experts import strategy_dir, train_experts
from .inference import ROUTED_STRATEGIES, compute_elrea_centroids
from .pipeline import cluster, cluster_inputs, load_data, warmup_key
from .preflight import preflight
from .report import make_report
from .router import train_routers
from .runs import Run, config_hash, new_command, note

STEPS = ("cluster", "experts", "router", "evaluate", "report")


def elrea_centroids(config: RunConfig) -> str:
    """The ensemble's per-cluster mean gradients; returns the stage key (an input of evaluation)."""
    run = Run(config.out)
    inputs = {"warm-up": warmup_key(config), "clusters": config_hash(cluster_inputs(config))}
    key = config_hash(inputs)
    if run.is_done("elrea-centroids", key, inputs):
        return key
    records = load_data(run, config)
    with run.stage("elrea-centroids", key, inputs) as stage:
        compute_elrea_centroids(config, records)
        stage["outputs"] = ["elrea/centroids.safetensors"]
    return key


def adapter_strategies(strategies: list[str]) -> list[str]:
    """Strategies that need adapters of their own (elrea-ensemble reuses the routed experts)."""
    return list(dict.fromkeys(s if s != "elrea-ensemble" else "routed" for s in strategies))


def evaluate_inputs(run: Run, config: RunConfig, strategies: list[str], centroids_key: str | None) -> dict[str, str]:
    """What the evaluation reads: its settings, the test data's content, and every adapter, router and centroid it serves with."""
    adapters = {}
    for strategy in adapter_strategies(strategies):
        groups = json.loads((strategy_dir(run, strategy) / "partition.json").read_text())["groups"]
        adapters[strategy] = [run.stage_entry(f"experts/{strategy}/{g}").get("key") for g in groups]
    routers = {s: run.stage_entry(f"router/{s}").get("key") for s in adapter_strategies(strategies) if s in ROUTED_STRATEGIES}
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
    result["experts"] = train_experts(config, adapter_strategies(wanted))
    if last == "experts":
        return result
    result["router"] = train_routers(config, adapter_strategies(wanted))
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
