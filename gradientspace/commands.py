"""`gradientspace run CONFIG` and the stage-by-stage commands: the stages in order, each skipping itself when done.

cluster (data → warm-up → gradients + sketch → clusters) → each strategy's partition → the
generalist, then the experts of every strategy (branched from it) → routers → each expert kept,
blended with the fall-back adapter or dropped on the validation records its router sends it → router
thresholds chosen on validation → a model card in every served adapter folder → ELREA centroids (when the ensemble is evaluated) → evaluation →
report. Each stage requires the ones it reads (`runs.Stage.requires`), so asking the run for one
target (`runner.Run.build`) builds what is missing before it, once; `run_until(config, "experts")`
asks for the targets of one command, so `train-experts`, `train-router` and `evaluate` bring their
prerequisites up to date first (a finished stage costs one line). Every check that can fail
cheaply (`preflight`) runs before the first stage, and the run's lock is held from then until the
command ends.
"""

from __future__ import annotations

import json

from gradientspace.clustering.stages import cluster
from gradientspace.config import RunConfig
from gradientspace.evaluation.evaluate import EvaluateStage
from gradientspace.evaluation.report import ReportStage
from gradientspace.experts.adapters import train_experts
from gradientspace.experts.strategies import routed, trained
from gradientspace.preflight import preflight
from gradientspace.routing.ensemble import CentroidStage
from gradientspace.routing.keep import keep_decisions
from gradientspace.routing.router import train_routers
from gradientspace.routing.threshold import ThresholdStage, thresholds_chosen
from gradientspace.runner import Run, as_run
from gradientspace.runs import locked, new_command
from gradientspace.serving.cards import CardStage

STEPS = ("cluster", "experts", "router", "evaluate", "report")


# ---------------------------------------------------------------- the Python API of the stage-by-stage commands

# Each takes a `runner.Run` (several calls sharing one: records and model loaded once) or a config to make one of.


def validation_records(run: Run | RunConfig) -> list:
    """The validation split (`data.validation_fraction`): never trained on; keep decisions and thresholds are chosen on it."""
    return as_run(run).validation


def decide_experts(run: Run | RunConfig, strategies: list[str] | None = None) -> dict:
    """Keep, blend or drop every branched expert on the validation records it would serve (`keep.py`)."""
    run = as_run(run)
    return keep_decisions(run, trained(strategies or run.config.experts.strategies, run.config))


def router_thresholds(run: Run | RunConfig, strategies: list[str] | None = None) -> dict:
    """Each routed strategy's threshold chosen on validation (`router.threshold: auto`; none when it is set by hand)."""
    run = as_run(run)
    if not thresholds_chosen(run):
        return {}
    wanted = routed(strategies or run.config.experts.strategies, run.config)
    return {s: entry.get("threshold") for s, entry in zip(wanted, run.build(*[ThresholdStage(s) for s in wanted]))}


def elrea_centroids(run: Run | RunConfig) -> str:
    """The ensemble's per-cluster mean gradients; returns the stage key."""
    return as_run(run).build(CentroidStage())[0]["key"]


def run_until(
    run: Run | RunConfig, last: str = "report", strategies: list[str] | None = None, overwrite: bool = False
) -> dict:
    """Check everything cheap first, then build every stage up to `last` (one of STEPS), skipping finished ones.

    Under torchrun every rank takes its shard of the gradient pass, of each batch of the warm-up and
    the generalist (DDP), of the adapters after the generalist and of the evaluation; the strategies'
    routers, keep decisions and thresholds are dealt over the ranks (`runner.Run.build`), and the
    report is drawn by rank 0.
    """
    new_command()
    run = as_run(run)
    config = run.config
    wanted = list(strategies or config.experts.strategies)
    preflight(run, evaluate=STEPS.index(last) >= STEPS.index("evaluate"), overwrite=overwrite)
    with locked(config.out):  # a second command on this run stops here, naming this one
        run.directory.reload()  # preflight read the manifest before the lock: another command may have written since
        result: dict = {"cluster": cluster(run)}
        if last == "cluster":
            return result
        result["experts"] = train_experts(run, wanted)
        if STEPS.index(last) >= STEPS.index("router"):
            result["router"] = train_routers(run, wanted)
            result["kept"] = decide_experts(run, wanted)
            result["thresholds"] = router_thresholds(run, wanted)
            run.build(*[CardStage(s) for s in trained(wanted, run.config)])  # once every served adapter is decided
        if last in ("experts", "router"):
            return result
        run.build(EvaluateStage(wanted))
        result["eval"] = json.loads(run.path("eval.json").read_text()) if run.is_main else None
        if last == "evaluate":
            return result
        result["figures"] = [
            run.path(p) for p in run.build(ReportStage())[0]["outputs"]
        ]  # drawn by rank 0, every rank waits
        return result


def run_all(run: Run | RunConfig, overwrite: bool = False) -> dict:
    """`gradientspace run CONFIG`: every stage."""
    return run_until(run, "report", overwrite=overwrite)
