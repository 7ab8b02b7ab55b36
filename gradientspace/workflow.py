"""`gradientspace run CONFIG` and the stage-by-stage commands: the stages in order, each skipping itself when done.

cluster (data → warm-up → gradients + sketch → clusters) → the generalist, then the experts of
every strategy (branched from it) → routers → each expert kept, blended with the generalist or
dropped on the validation records its router sends it → router thresholds chosen on validation → ELREA centroids (when the ensemble is evaluated) → evaluation →
report. `run_until(config, "experts")` runs the stages up to and including one, so
`train-experts`, `train-router` and `evaluate` bring their prerequisites up to date first (a
finished stage costs one line). Every check that can fail cheaply (`preflight`) runs before the
first stage, and the run's lock is held from then until the command ends.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from . import distributed
from .config import RunConfig
from .data import fingerprint, validation_ids
from .evaluate import evaluate_strategies
from .experts import train_experts
from .inference import calibrate_threshold, compute_elrea_centroids
from .keep import keep_decisions
from .pipeline import cluster, cluster_inputs, load_data, warmup_key
from .preflight import preflight
from .report import make_report
from .router import train_routers
from .runs import Run, Stage, config_hash, locked, new_command
from .strategies import GENERALIST, get, routed, trained

STEPS = ("cluster", "experts", "router", "evaluate", "report")


class CentroidStage(Stage):
    """The ELREA ensemble's per-cluster mean gradients (w.r.t. the generalist)."""
    name = "elrea-centroids"

    def __init__(self, run: Run, config: RunConfig, records: list):
        self.run_dir, self.config, self.records = run, config, records

    def inputs(self) -> dict[str, str]:
        return {"warm-up": warmup_key(self.config), "clusters": config_hash(cluster_inputs(self.config)),
                "generalist": str(self.run_dir.stage_entry(f"experts/{GENERALIST}/0").get("key"))}

    def run(self, key: str, record: dict) -> None:
        compute_elrea_centroids(self.config, self.records)
        record["outputs"] = ["elrea/centroids.safetensors"]


def elrea_centroids(config: RunConfig) -> str:
    """The ensemble's per-cluster mean gradients; returns the stage key (an input of evaluation)."""
    run = Run(config.out)
    return run.execute(CentroidStage(run, config, load_data(run, config)))["key"]


def validation_records(run: Run, config: RunConfig) -> list:
    """The validation split (`data.validation_fraction`): never trained on; keep decisions and thresholds are chosen on it."""
    records = load_data(run, config)
    held = validation_ids(records, config.data.validation_fraction, config.seed)
    return [r for r in records if r.id in held]


def decide_experts(config: RunConfig, strategies: list[str] | None = None) -> dict:
    """Keep, blend or drop every branched expert on the validation records it would serve (`keep.py`); rank 0."""
    run = Run(config.out)
    validation = validation_records(run, config)
    if not validation:
        return {}
    return keep_decisions(run, config, trained(strategies or config.experts.strategies), validation)


def served_inputs(run: Run, strategy: str) -> dict[str, str]:
    """What serving a strategy's adapters reads: every adapter's stage key and its keep decision (`keep.py`)."""
    groups = json.loads((get(strategy).folder(run) / "partition.json").read_text())["groups"]
    return {"adapters": config_hash([run.stage_entry(f"experts/{strategy}/{g}").get("key") for g in groups]),
            "keep decisions": str(run.stage_entry(f"keep/{strategy}").get("key"))}


class ThresholdStage(Stage):
    """`router.threshold: auto`: the router's threshold chosen on the validation split, after its experts are kept, blended or dropped."""

    def __init__(self, run: Run, config: RunConfig, strategy: str, validation: list):
        self.name = f"threshold/{strategy}"
        self.run_dir, self.config, self.strategy, self.validation = run, config, strategy, validation

    def inputs(self) -> dict[str, str]:
        run = self.run_dir
        return {"router": str(run.stage_entry(f"router/{self.strategy}").get("key")), **served_inputs(run, self.strategy),
                "generalist": str(run.stage_entry(f"experts/{GENERALIST}/0").get("key")),
                "validation records": config_hash(sorted(r.id for r in self.validation))}

    def run(self, key: str, record: dict) -> None:
        record.update(calibrate_threshold(self.config, self.strategy, self.validation))
        record["outputs"] = [str((get(self.strategy).router_folder(self.run_dir) / "router.json").relative_to(self.run_dir.root))]


def router_thresholds(config: RunConfig, strategies: list[str] | None = None) -> dict:
    """Each routed strategy's threshold chosen on validation (`router.threshold: auto`; none when it is set by hand)."""
    run = Run(config.out)
    if config.router.threshold != "auto":
        return {}
    validation = validation_records(run, config)
    if not validation:
        return {}
    return {strategy: run.execute(ThresholdStage(run, config, strategy, validation)).get("threshold")
            for strategy in routed(strategies or config.experts.strategies)}


def evaluate_inputs(run: Run, config: RunConfig, strategies: list[str], centroids_key: str | None) -> dict[str, str]:
    """What the evaluation reads: its settings, the test data's content, and every adapter (with its keep decision), router,
    threshold, centroid and gradient space it serves with."""
    adapters = {strategy: served_inputs(run, strategy) for strategy in trained(strategies)}
    routers = {s: [run.stage_entry(f"{stage}/{s}").get("key") for stage in ("router", "threshold")]
               for s in routed(strategies)}
    return {"strategies": config_hash(strategies), "test data": fingerprint(config.evaluate.data),
            "evaluation settings": config_hash(asdict(config.evaluate), asdict(config.router), config.seed),
            "model": config_hash(asdict(config.model)), "adapters": config_hash(adapters), "routers": config_hash(routers),
            # `gradient-oracle` routes by the warm-up adapter's gradients projected on the sketch, onto the clusters
            "warm-up and clusters": config_hash(warmup_key(config), run.stage_entry("cluster").get("key")),
            "elrea centroids": str(centroids_key)}


class EvaluateStage(Stage):
    """Every asked strategy on the test data: NLL, answer accuracy, latency (`eval.json`, `eval.md`)."""
    name = "evaluate"

    def __init__(self, run: Run, config: RunConfig, strategies: list[str], centroids_key: str | None):
        self.run_dir, self.config, self.strategies, self.centroids_key = run, config, strategies, centroids_key

    def inputs(self) -> dict[str, str]:
        return evaluate_inputs(self.run_dir, self.config, self.strategies, self.centroids_key)

    def run(self, key: str, record: dict) -> None:
        evaluate_strategies(self.config, self.strategies)
        record["outputs"] = ["eval.json", "eval.md"]


def evaluate_stage(config: RunConfig, strategies: list[str]) -> dict | None:
    """The evaluation, sharded across ranks under torchrun; its results on rank 0 (None elsewhere)."""
    centroids_key = elrea_centroids(config) if any(get(s).needs_cluster_centroids for s in strategies) else None
    run = Run(config.out)
    run.execute(EvaluateStage(run, config, strategies, centroids_key))
    return json.loads(run.path("eval.json").read_text()) if distributed.is_main() else None


class ReportStage(Stage):
    """Figures and `report.html`: cheap, and they read everything, so they are redrawn every time."""
    name = "report"
    always = True

    def __init__(self, run: Run):
        self.run_dir = run

    def inputs(self) -> dict[str, str]:
        return {}

    def run(self, key: str, record: dict) -> None:
        record["outputs"] = [str(f.relative_to(self.run_dir.root)) for f in make_report(self.run_dir.root)]


def run_until(config: RunConfig, last: str = "report", strategies: list[str] | None = None, overwrite: bool = False) -> dict:
    """Check everything cheap first, then run every stage up to `last` (one of STEPS), skipping finished ones.

    Under torchrun every rank takes its shard of the gradient pass, of the adapters after the
    generalist (`experts.spread_over_ranks`) and of the evaluation; the warm-up, the generalist,
    routers and thresholds train on rank 0 (one-process Trainer jobs) while the other ranks wait,
    and the report is drawn by rank 0.
    """
    new_command()
    wanted = list(strategies or config.experts.strategies)
    preflight(config, evaluate=STEPS.index(last) >= STEPS.index("evaluate"), overwrite=overwrite)
    with locked(config.out):  # a second command on this run stops here, naming this one
        return _run_stages(config, last, wanted)


def _run_stages(config: RunConfig, last: str, wanted: list[str]) -> dict:
    result: dict = {"cluster": cluster(config)}
    if last == "cluster":
        return result
    result["experts"] = train_experts(config, trained(wanted))  # every rank: the adapters are spread over them
    if distributed.is_main():
        if STEPS.index(last) >= STEPS.index("router"):
            result["router"] = train_routers(config, routed(wanted))
            result["kept"] = decide_experts(config, wanted)
            result["thresholds"] = router_thresholds(config, wanted)
        if STEPS.index(last) >= STEPS.index("evaluate") and any(get(s).needs_cluster_centroids for s in wanted):
            elrea_centroids(config)
    if last in ("experts", "router"):
        return result
    distributed.barrier()  # the other ranks wait here while rank 0 trains, then score their shard of the test data
    result["eval"] = evaluate_stage(config, wanted)
    if last == "evaluate" or not distributed.is_main():
        return result
    run = Run(config.out)
    result["figures"] = [run.path(p) for p in run.execute(ReportStage(run))["outputs"]]
    return result


def run_all(config: RunConfig, overwrite: bool = False) -> dict:
    """`gradientspace run CONFIG`: every stage."""
    return run_until(config, "report", overwrite=overwrite)
