"""Keep, blend or fall back: each expert decided on the validation records that serving would send it.

An expert branched from the generalist is served only where it helps. The decision is made the way
test prompts will be served: every validation record (never trained on) goes to the group its
strategy would pick for it — the router's top choice for a routed strategy, the true label for
`oracle`, the one group of `single-continued` — and group g's adapter is judged on its records V_g
against the strategy's fall-back adapter F on the same records (`Strategy.falls_back_to`: the single
adapter of record, `single-continued` as its own keep stage served it, or the generalist, against
which `single-continued` itself is decided).

Blending. For each weight λ in `experts.blend_weights` the candidate adapter's update is

    Δ_λ = (1 − λ)·Δ_F + λ·Δ_E,    Δ = s·B A,

which peft's `add_weighted_adapter(combination_type="cat")` builds exactly: A stacked by rows, s·B by
columns, the ranks added, scale 1 — one plain peft folder (`<group>/blended/`) that vLLM and SGLang
load as it is, so a prompt still costs one router pass and one adapter. λ = 1 is the expert itself,
λ = 0 the fall-back.

The rule, fixed before any test number is read: λ* minimises the mean NLL on V_g; it is kept only if
V_g holds at least `experts.keep_min_records` records and the one-sided `experts.keep_confidence`
upper bound of the paired bootstrap of mean(NLL_λ* − NLL_F) over V_g is below zero. Otherwise the
group falls back (λ = 0). Choosing λ* on the same records makes the bound a little optimistic; the
margin is what keeps a gain shown by one or two records, or by 0.0003 nats, from being served.
"""

from __future__ import annotations

import shutil

import numpy as np

from gradientspace import distributed
from gradientspace.config import RunConfig
from gradientspace.data.records import Record
from gradientspace.experts.adapters import (
    BLENDED,
    AdapterStage,
    StrategyAdapters,
    decided,
    group_records,
    read_partition,
    served_fallback,
    served_groups,
)
from gradientspace.experts.strategies import GENERALIST, ROUTER_UNSURE, Choice, get
from gradientspace.routing.model import StrategyModel
from gradientspace.routing.router import RouterStage
from gradientspace.runs import Placement, Stage, add_to_section, config_hash, write_json

BOOTSTRAP_RESAMPLES = 2000


def bootstrap_upper_bound(differences: np.ndarray, confidence: float, seed: int) -> float:
    """One-sided upper confidence bound of the mean of paired differences: the `confidence` quantile of resampled means."""
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), size=(BOOTSTRAP_RESAMPLES, len(differences)))].mean(axis=1)
    return float(np.quantile(means, confidence))


def keep_rule(
    candidates: dict[float, list[float]], fallback: list[float], confidence: float, min_records: int, seed: int
) -> dict:
    """The decision for one group: `candidates` maps λ to each record's NLL under that blend, `fallback` the fall-back adapter's."""
    base = np.asarray(fallback)
    means = {weight: float(np.mean(nll)) for weight, nll in candidates.items()}
    best = min(means, key=lambda weight: (means[weight], -weight))  # a tie goes to the larger λ: the expert as trained
    gain = np.asarray(candidates[best]) - base
    upper = bootstrap_upper_bound(gain, confidence, seed)
    if len(base) < min_records:
        weight, reason = (
            0.0,
            f"{len(base)} validation record(s) routed to it, fewer than experts.keep_min_records = {min_records}",
        )
    elif upper >= 0:
        weight, reason = (
            0.0,
            f"best blend λ = {best} changes NLL by {gain.mean():+.4f}, upper {confidence:.0%} bound {upper:+.4f} is not below 0",
        )
    else:
        weight, reason = (
            best,
            f"λ = {best} changes NLL by {gain.mean():+.4f} (upper {confidence:.0%} bound {upper:+.4f})",
        )
    return {
        "lambda": weight,
        "reason": reason,
        "validation_records": len(base),
        "fallback_nll": float(base.mean()),
        "candidate_nll": {str(w): m for w, m in means.items()},
        "best_lambda": best,
        "gain": float(gain.mean()),
        "upper_bound": upper,
    }


def blend_name(strategy: str, group: str, weight: float) -> str:
    return f"{StrategyModel.adapter_name(strategy, group)}__blend{round(weight * 1000)}"  # peft adapter names cannot hold a "."


def decide(
    engine: StrategyModel, config: RunConfig, strategy: str, group: str, validation: list[Record], shared: bool = False
) -> tuple[dict | None, list[int]]:
    """One group's decision (`keep_rule`) on the validation records its strategy sends it, against the strategy's
    fall-back on the same records, and how many of them each rank scored; each blend is built in the engine's model as
    one adapter of the two ranks added. `shared`: every rank calls it and scores its strided share of the records, and
    rank 0 decides on them all (the others get None)."""
    experts = config.experts
    index = engine.groups[strategy].index(group)
    routed = get(strategy).serving_groups(engine, validation)
    routed = distributed.from_main(routed) if shared else routed  # one split of the records, whatever a rank's floats
    records = [record for record, g in zip(validation, routed) if g == index]
    expert = engine.own_adapter(strategy, index)
    if expert is None:
        reason = "no adapter was trained (no training records)"
        return {"lambda": 0.0, "reason": reason, "validation_records": len(records)}, []
    if not records:
        return {"lambda": 0.0, "reason": "no validation record is routed to it", "validation_records": 0}, []
    mine = distributed.strided_share(len(records)) if shared else list(range(len(records)))
    scored = [records[i] for i in mine]
    fallback = engine.fallback_for(strategy)
    nll = {"fall-back": engine.nll_for_choices([engine.serve_group(strategy, ROUTER_UNSURE)] * len(scored), scored)}
    for weight in sorted(set(experts.blend_weights)):
        adapter = expert if weight == 1 else blend_name(strategy, group, weight)
        if weight != 1:
            engine.bank.drop(adapter)  # peft would keep an older blend of that name (the bank outlives this decision)
            engine.model.add_weighted_adapter([fallback, expert], [1 - weight, weight], adapter, combination_type="cat")
        nll[weight] = engine.nll_for_choices([Choice({adapter: 1.0}, index, 1.0)] * len(scored), scored)
    gathered = distributed.gathered_in_order(len(records), mine, nll) if shared else (nll, [len(records)])
    if gathered is None:
        return None, []
    whole, scored_per_rank = gathered
    fallback_nll = whole.pop("fall-back")
    decision = keep_rule(whole, fallback_nll, experts.keep_confidence, experts.keep_min_records, config.seed)
    return decision, scored_per_rank


def save_blend(engine: StrategyModel, strategy: str, group: str, weight: float) -> None:
    """The chosen blend as a plain peft folder, `<group>/blended/`, written whole before it replaces an older one."""
    folder = get(strategy).folder(engine.run) / group
    tmp = folder / f"{BLENDED}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    name = blend_name(strategy, group, weight)
    engine.model.save_pretrained(
        str(tmp), selected_adapters=[name]
    )  # peft saves a named adapter in a sub-folder of that name
    shutil.rmtree(folder / BLENDED, ignore_errors=True)
    (tmp / name).replace(folder / BLENDED)
    shutil.rmtree(tmp)


class KeepGroupStage(Stage):
    """One group's keep / blend / fall-back decision (in its record) and its blended adapter: the groups of every deciding
    strategy are dealt over the ranks together; the one group of a strategy of one adapter, which has nothing to deal
    it with (the fall-back the others wait for), is scored by every rank, each its share of the records."""

    def __init__(self, strategy: str, group: str):
        self.name = f"keep/{strategy}/{group}"
        self.strategy, self.group = strategy, group
        self.placement = Placement.EVERY if get(strategy).one_adapter_on_every_record else Placement.SPREAD

    def requires(self, run):
        yield StrategyAdapters(self.strategy)
        yield AdapterStage(GENERALIST, "0")
        fallback = get(self.strategy).falls_back_to(run.config)
        if fallback not in (GENERALIST, self.strategy):  # decided against the fall-back as it is served
            yield served_stage(run, fallback)
        if get(self.strategy).router_folder(run) is not None:  # the validation records go where its router sends them
            yield RouterStage(self.strategy)

    def work(self, run) -> float:
        # the records scored are those the router sends the group: its own share of the validation split comes closest
        _, validation = group_records(run, self.strategy, self.group)
        return float(len(validation))

    def inputs(self, run) -> dict[str, str]:
        experts = run.config.experts
        return {
            "keep rule": config_hash(
                experts.blend_weights, experts.keep_confidence, experts.keep_min_records, run.config.seed
            ),
            "fall-back": get(self.strategy).falls_back_to(run.config),
            "validation records": config_hash(sorted(run.validation_ids)),
        }

    def run(self, run, key: str, record: dict) -> None:
        engine = StrategyModel(run, [self.strategy], undecided=self.strategy)
        shared = self.placement is Placement.EVERY
        decision, scored = decide(engine, run.config, self.strategy, self.group, run.validation, shared)
        if decision is not None:  # rank 0 of a shared decision, or the rank it was dealt to
            outputs = []
            if 0 < decision["lambda"] < 1:
                save_blend(engine, self.strategy, self.group, decision["lambda"])
                outputs.append(get(self.strategy).folder(run) / self.group / BLENDED / "adapter_model.safetensors")
            record.update(decision=decision, outputs=[str(p.relative_to(run.directory.root)) for p in outputs])
            record["records_per_rank"] = scored
        for weight in run.config.experts.blend_weights:  # the run's one bank keeps serving adapters only
            engine.bank.drop(blend_name(self.strategy, self.group, weight))


class KeepStage(Stage):
    """One strategy's keep / blend / fall-back decisions, one `KeepGroupStage` per group, in `keep.json` (which names its
    fall-back) and in the manifest's summary of its experts."""

    def __init__(self, strategy: str):
        self.name = f"keep/{strategy}"
        self.strategy = strategy

    def requires(self, run):
        yield StrategyAdapters(self.strategy)  # the partition names the groups
        yield self.groups(run)

    def groups(self, run) -> list[KeepGroupStage]:
        return [KeepGroupStage(self.strategy, group) for group in read_partition(run, self.strategy)["groups"]]

    def inputs(self, run) -> dict[str, str]:
        return {"fall-back": get(self.strategy).falls_back_to(run.config)}

    def run(self, run, key: str, record: dict) -> None:
        decisions = {stage.group: run.directory.stage_entry(stage.name)["decision"] for stage in self.groups(run)}
        folder = get(self.strategy).folder(run)
        write_json(
            folder / "keep.json",
            {"strategy": self.strategy, "fallback": get(self.strategy).falls_back_to(run.config), "groups": decisions},
        )
        record.update(groups=decisions, outputs=[str((folder / "keep.json").relative_to(run.directory.root))])
        # the strategy's summary in the manifest gains each expert's decision
        summary = run.directory.manifest.get("experts", {}).get(self.strategy)
        if summary:
            for group, decision in decisions.items():
                summary["experts"].setdefault(group, {}).update(
                    kept=decision["lambda"] > 0, **{k: decision.get(k) for k in ("lambda", "reason")}
                )
            summary["fallback"] = [g for g, (path, _) in served_groups(run, self.strategy).items() if path is None]
            owner, path = served_fallback(run, self.strategy)
            summary["fallback_adapter"] = {"strategy": owner, "folder": str(path.relative_to(run.directory.root))}
            add_to_section(record, "experts", self.strategy, summary)


def served_stage(run, strategy: str) -> Stage:
    """What serving a strategy's adapters reads: its keep decisions where it has them (`experts.decided`, and a validation
    split to decide on), else its adapters as trained."""
    return KeepStage(strategy) if decided(run.config, strategy) and run.validation_ids else StrategyAdapters(strategy)


def keep_decisions(run, strategies: list[str]) -> dict[str, dict]:
    """Each deciding strategy's decisions, by group (on every rank); `run` is a `runner.Run` or a config to make one of."""
    from gradientspace.runner import as_run

    run = as_run(run)
    wanted = [s for s in strategies if isinstance(served_stage(run, s), KeepStage)]
    # a strategy is decided against its fall-back as served: the fall-backs' decisions first, then every group of the
    # others dealt over the ranks together (a sibling built as another's parent is built alone)
    fallbacks = {get(s).falls_back_to(run.config) for s in wanted}
    run.build(*[KeepStage(s) for s in wanted if s in fallbacks])
    run.build(*[StrategyAdapters(s) for s in wanted])  # their partitions name the groups
    run.build(*[group for s in wanted if s not in fallbacks for group in KeepStage(s).groups(run)])
    return {s: entry["groups"] for s, entry in zip(wanted, run.build(*[KeepStage(s) for s in wanted]))}
