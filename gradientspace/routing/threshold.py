"""The router threshold chosen on validation: below it a prompt goes to the fall-back adapter (`router.threshold: auto`).

Once a strategy's experts are kept, blended or dropped, every validation record is served both
ways — by the router's pick and by the fall-back — and the threshold that minimises the mean NLL
is stored in the router's `router.json` (`ThresholdStage`).
"""

from __future__ import annotations

import json

from gradientspace import distributed
from gradientspace.experts.adapters import AdapterStage
from gradientspace.experts.strategies import GENERALIST, ROUTER_UNSURE, get
from gradientspace.routing.keep import served_stage
from gradientspace.routing.model import StrategyModel
from gradientspace.routing.router import RouterStage
from gradientspace.runner import Run
from gradientspace.runs import Placement, Stage, config_hash, write_json


def best_threshold(
    top_probabilities: list[float], expert_nll: list[float], fallback_nll: list[float]
) -> tuple[float, float]:
    """(threshold, mean NLL) minimising the validation NLL of "expert if probability ≥ threshold, else the fall-back".

    Candidates are 0 (always the expert) and every observed probability, plus one above them all
    (always the fall-back); ties go to the lowest threshold, which trusts the router most.
    """
    candidates = sorted({0.0, *top_probabilities, 1.0 + 1e-9})

    def mean_nll(threshold: float) -> float:
        chosen = [e if p >= threshold else g for p, e, g in zip(top_probabilities, expert_nll, fallback_nll)]
        return sum(chosen) / max(len(chosen), 1)

    scored = [(round(mean_nll(t), 10), t) for t in candidates]
    value, threshold = min(scored, key=lambda pair: (pair[0], pair[1]))
    return threshold, value


def calibrate_threshold(run: Run, strategy: str) -> dict | None:
    """Choose the router threshold on the validation split, against the strategy's fall-back adapter, and store it in the
    router's `router.json`. Under torchrun every rank scores its strided share of the records and rank 0 chooses and
    writes (the others get None)."""
    validation = run.validation
    mine = distributed.strided_share(len(validation))
    scored = [validation[i] for i in mine]
    engine = StrategyModel(run, [strategy])
    top, expert_nll, fallback_nll = [], [], []
    if scored:  # a rank may have no share (more ranks than records)
        probabilities = engine.routers[strategy].probabilities([r.prompt_text for r in scored])
        top, choice = (values.tolist() for values in probabilities.max(dim=1))
        experts = [engine.serve_group(strategy, c, p) for c, p in zip(choice, top)]
        expert_nll = engine.nll_for_choices(experts, scored)
        fallback_nll = engine.nll_for_choices([engine.serve_group(strategy, ROUTER_UNSURE)] * len(scored), scored)
    columns = {"top": top, "expert": expert_nll, "fall-back": fallback_nll}
    gathered = distributed.gathered_in_order(len(validation), mine, columns)
    if gathered is None:
        return None
    whole, scored_per_rank = gathered
    top, expert_nll, fallback_nll = whole["top"], whole["expert"], whole["fall-back"]
    threshold, value = best_threshold(top, expert_nll, fallback_nll)
    details = {
        "threshold": threshold,
        "validation_records": len(validation),
        "validation_nll": value,
        "fallback": engine.fallback_for(strategy),
        "validation_nll_always_expert": sum(expert_nll) / max(len(validation), 1),
        "validation_nll_always_fallback": sum(fallback_nll) / max(len(validation), 1),
    }
    folder = get(strategy).router_folder(run)
    info = json.loads((folder / "router.json").read_text())
    write_json(folder / "router.json", {**info, "threshold": threshold, "calibration": details})
    return {**details, "records_per_rank": scored_per_rank}


class ThresholdStage(Stage):
    """`router.threshold: auto`: the router's threshold chosen on the validation split, after its experts are kept, blended or dropped."""

    placement = Placement.EVERY  # every rank scores its share of the validation records

    def __init__(self, strategy: str):
        self.name = f"threshold/{strategy}"
        self.strategy = strategy

    def requires(self, run: Run):
        return [RouterStage(self.strategy), served_stage(run, self.strategy), AdapterStage(GENERALIST, "0")]

    def inputs(self, run: Run) -> dict[str, str]:
        return {"validation records": config_hash(sorted(run.validation_ids))}

    def run(self, run: Run, key: str, record: dict) -> None:
        details = calibrate_threshold(run, self.strategy)
        if details is not None:  # rank 0
            record.update(details)
            record["outputs"] = [
                str((get(self.strategy).router_folder(run) / "router.json").relative_to(run.directory.root))
            ]


def thresholds_chosen(run: Run) -> bool:
    """Whether routers' thresholds are chosen on validation: `router.threshold: auto`, and a validation split to choose on."""
    return run.config.router.threshold == "auto" and bool(run.validation_ids)
