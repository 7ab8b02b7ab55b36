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
from dataclasses import asdict

from gradientspace.clustering.stages import ClusterStage, cluster
from gradientspace.config import RunConfig
from gradientspace.data.records import fingerprint
from gradientspace.evaluation.evaluate import evaluate_strategies
from gradientspace.evaluation.scores import SPLITS, Scores, evaluation_records, write_scores
from gradientspace.experts.adapters import AdapterStage, PartitionStage, train_experts
from gradientspace.experts.cards import CardStage
from gradientspace.experts.keep import keep_decisions, served_stage
from gradientspace.experts.strategies import GENERALIST, get, routed, trained
from gradientspace.models.inference import calibrate_threshold, compute_elrea_centroids
from gradientspace.preflight import preflight
from gradientspace.routing.router import RouterStage, train_routers
from gradientspace.runner import Run, as_run
from gradientspace.runs import Placement, Stage, config_hash, locked, new_command

STEPS = ("cluster", "experts", "router", "evaluate", "report")


class CentroidStage(Stage):
    """The ELREA ensemble's per-cluster mean gradients (w.r.t. the generalist)."""

    name = "elrea-centroids"

    def requires(self, run: Run):
        return [PartitionStage("routed"), AdapterStage(GENERALIST, "0")]

    def inputs(self, run: Run) -> dict[str, str]:
        return {}

    def run(self, run: Run, key: str, record: dict) -> None:
        compute_elrea_centroids(run.config, run.records)
        record["outputs"] = ["elrea/centroids.safetensors"]


class ThresholdStage(Stage):
    """`router.threshold: auto`: the router's threshold chosen on the validation split, after its experts are kept, blended or dropped."""

    def __init__(self, strategy: str):
        self.name = f"threshold/{strategy}"
        self.strategy = strategy

    def requires(self, run: Run):
        return [RouterStage(self.strategy), served_stage(run, self.strategy), AdapterStage(GENERALIST, "0")]

    def inputs(self, run: Run) -> dict[str, str]:
        return {"validation records": config_hash(sorted(run.validation_ids))}

    def run(self, run: Run, key: str, record: dict) -> None:
        record.update(calibrate_threshold(run.config, self.strategy, run.validation))
        record["outputs"] = [
            str((get(self.strategy).router_folder(run) / "router.json").relative_to(run.directory.root))
        ]


def thresholds_chosen(run: Run) -> bool:
    """Whether routers' thresholds are chosen on validation: `router.threshold: auto`, and a validation split to choose on."""
    return run.config.router.threshold == "auto" and bool(run.validation_ids)


class PipelineStages:
    """The stages a strategy asks for by what they give (`strategies.PipelineStages`), for one run."""

    def __init__(self, run: Run):
        self.run = run

    def clusters(self) -> Stage:
        return ClusterStage()

    def served(self, strategy: str) -> Stage:
        return served_stage(self.run, strategy)

    def router(self, strategy: str) -> list[Stage]:
        return [RouterStage(strategy)] + ([ThresholdStage(strategy)] if thresholds_chosen(self.run) else [])

    def centroids(self) -> Stage:
        return CentroidStage()


def serving_stages(run: Run, strategy: str) -> list[Stage]:
    """Every stage whose output serving `strategy` reads, as the strategy says (`Strategy.serving_stages`)."""
    return get(strategy).serving_stages(PipelineStages(run))


class ScoreStage(Stage):
    """A split's score matrices (`evaluation/scores.py`): every record under every adapter the run's strategies trained or
    blended, and what each router said of it; each rank scores its shard. The test split's is built by the evaluation, after
    every decision."""

    placement = Placement.EVERY

    def __init__(self, split: str):
        self.split, self.name = split, f"scores/{split}"

    def requires(self, run: Run):
        return [stage for strategy in run.config.experts.strategies for stage in serving_stages(run, strategy)]

    def inputs(self, run: Run) -> dict[str, str]:
        config = run.config
        if self.split == "validation":
            records = {"validation records": config_hash(sorted(run.validation_ids))}
        else:
            records = {
                "test data": fingerprint(config.evaluate.data, config.data.subset, config.evaluate.split),
                "test selection": config_hash(config.evaluate.limit, config.data.per_source, config.seed),
            }
        return {
            **records,
            "strategies": config_hash(config.experts.strategies),
            "model": config_hash(asdict(config.model), config.data.max_length),
        }

    def run(self, run: Run, key: str, record: dict) -> None:
        records = run.validation if self.split == "validation" else evaluation_records(run.config)
        record["outputs"] = write_scores(run, list(run.config.experts.strategies), self.split, records)


class EvaluateStage(Stage):
    """Every asked strategy on the test data: NLL (looked up in the test score matrix), answer accuracy, latency (`eval.json`,
    `eval.md`); each rank its shard."""

    name = "evaluate"
    placement = Placement.EVERY

    def __init__(self, strategies: list[str]):
        self.strategies = strategies

    def requires(self, run: Run):
        # both matrices: the validation one for questions asked later, the test one that the NLL is looked up in
        return [stage for strategy in self.strategies for stage in serving_stages(run, strategy)] + [
            ScoreStage(split) for split in SPLITS if split != "validation" or run.validation_ids
        ]

    def inputs(self, run: Run) -> dict[str, str]:
        config = run.config
        return {
            "strategies": config_hash(self.strategies),
            "test data": fingerprint(config.evaluate.data, config.data.subset, config.evaluate.split),
            "evaluation settings": config_hash(asdict(config.evaluate), asdict(config.router), config.seed),
            "model": config_hash(asdict(config.model)),
        }

    def run(self, run: Run, key: str, record: dict) -> None:
        evaluate_strategies(run.config, self.strategies, scores=Scores(run.path("scores", "test")))
        record["outputs"] = ["eval.json", "eval.md"]


class ReportStage(Stage):
    """Figures and `report.html`: cheap, and they read everything, so they are redrawn every time."""

    name = "report"
    always = True

    def inputs(self, run: Run) -> dict[str, str]:
        return {}

    def run(self, run: Run, key: str, record: dict) -> None:
        from gradientspace.evaluation.report import (
            make_report,  # matplotlib takes a second to import; only this stage draws
        )

        record["outputs"] = [str(f.relative_to(run.directory.root)) for f in make_report(run.directory.root)]


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
    config: RunConfig, last: str = "report", strategies: list[str] | None = None, overwrite: bool = False
) -> dict:
    """Check everything cheap first, then build every stage up to `last` (one of STEPS), skipping finished ones.

    Under torchrun every rank takes its shard of the gradient pass, of the adapters after the
    generalist (`experts.adapters.spread_over_ranks`) and of the evaluation; the warm-up, the generalist,
    routers, keep decisions and thresholds run on rank 0 while the others wait (`runner.Run.build`),
    and the report is drawn by rank 0.
    """
    new_command()
    wanted = list(strategies or config.experts.strategies)
    run = Run(config)
    preflight(run, evaluate=STEPS.index(last) >= STEPS.index("evaluate"), overwrite=overwrite)
    with locked(config.out):  # a second command on this run stops here, naming this one
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


def run_all(config: RunConfig, overwrite: bool = False) -> dict:
    """`gradientspace run CONFIG`: every stage."""
    return run_until(config, "report", overwrite=overwrite)
