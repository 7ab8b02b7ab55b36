"""The adapters of every strategy: the generalist, one LoRA expert per cluster, and the controls.

A strategy's *partition* assigns every training record to a group; one adapter is trained per
group on that group's training part, with early stopping on that group's share of the validation
split (`data.validation_fraction`, the same records for every strategy, never trained on).

The default protocol (`experts.init: generalist`): the `single` adapter (the generalist: one LoRA
on all the data, what a user would otherwise train) is trained first, early-stopped; every expert
then branches from it and continues on its own group at a lower learning rate. Whether each expert
is then kept, blended with the generalist or dropped (*falls back*) is decided on the validation
records the router would send it (`keep.py`), so routed inference does not lose to the generalist
on validation beyond the keep rule's margin. `experts.equal_budget` instead trains every adapter a
fixed number of epochs with no early stopping and no fall-back (equal tokens: budget curves).

Each strategy's partition comes from its object in `strategies.STRATEGIES`. Folders: the gradient
clusters' experts in `RUN/experts/<k>/`, every other strategy's adapters in `RUN/strategies/<name>/<k>/`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from . import distributed, runs
from .config import RunConfig
from .data import Record, tokenize, validation_ids
from .models import LoadedModel
from .pipeline import ModelOnDemand, load_data, warmup_key
from .runs import Run, Stage, config_hash, write_json
from .strategies import GENERALIST, cluster_count, get, trained
from .train import TrainPlan, train_adapter


def fresh_lora_state(model, seed: int) -> dict[str, torch.Tensor]:
    """A newly initialised LoRA (B = 0), seeded: the starting point of `experts.init: fresh`."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                module.reset_lora_parameters(adapter, True)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def generalist_folder(run: Run) -> Path:
    return get(GENERALIST).folder(run) / "0"


def wide_model_config(config: RunConfig, k: int):
    """LoRA rank K·r with the same alpha / r scale: as many trainable parameters as K experts."""
    return replace(config.model, lora_rank=config.model.lora_rank * k, lora_alpha=config.model.lora_alpha * k)


def _plan(config: RunConfig, branch: bool) -> TrainPlan:
    experts = config.experts
    epochs = experts.branch_epochs if branch and not experts.equal_budget else experts.epochs
    return TrainPlan(epochs, experts.branch_learning_rate if branch else experts.learning_rate, experts.batch_size, config.seed,
                     schedule=experts.schedule, warmup_ratio=experts.warmup_ratio,
                     patience=None if experts.equal_budget else experts.patience, snapshot_epochs=tuple(experts.snapshot_epochs))


def _start(run: Run, config: RunConfig, strategy: str) -> tuple[str, str | None]:
    """(where one strategy's adapters start: `fresh`, `warmup` or `generalist`, and the stage key of that adapter)."""
    if get(strategy).one_adapter or config.experts.init == "fresh":
        return "fresh", None
    if config.experts.init == "warmup":
        return "warmup", run.stage_entry("warmup").get("key")
    return "generalist", run.stage_entry(f"experts/{GENERALIST}/0").get("key")


class AdapterStage(Stage):
    """One adapter of one strategy: trained from its starting point on its group, stopped on the group's validation share."""

    def __init__(self, run: Run, config: RunConfig, strategy: str, group: str, train: list[Record], validation: list[Record],
                 model: ModelOnDemand, branch: bool):
        self.name = f"experts/{strategy}/{group}"
        self.run_dir, self.config, self.strategy, self.group = run, config, strategy, group
        self.train, self.validation, self.model, self.branch = train, validation, model, branch
        self.start, self.start_key = _start(run, config, strategy)

    def inputs(self) -> dict[str, str]:
        # the generalist ignores how experts branch from it, and no adapter depends on which other strategies are asked for
        # nor on how its expert is kept or blended afterwards (`keep.py`)
        ignored = ("strategies", "keep", "blend_weights", "keep_confidence", "keep_min_records")
        if get(self.strategy).one_adapter:
            ignored += ("init", "branch_epochs", "branch_learning_rate")
        config = self.config
        # the model this adapter trains on: `single-wide`'s has rank K·r, so a changed K retrains it
        return {"warm-up": warmup_key(config), "model": config_hash(asdict(self.model.config.model)),
                "training settings": config_hash({k: v for k, v in asdict(config.experts).items() if k not in ignored}, config.seed),
                "starting adapter": str(self.start_key), "training records": config_hash(sorted(r.id for r in self.train)),
                "validation records": config_hash(sorted(r.id for r in self.validation))}

    def initial_state(self, loaded: LoadedModel) -> dict[str, torch.Tensor]:
        if self.start == "fresh":
            return fresh_lora_state(loaded.model, self.config.seed)
        folder = self.run_dir.path("warmup") if self.start == "warmup" else generalist_folder(self.run_dir)
        return load_file(str(folder / "adapter_model.safetensors"))

    def run(self, key: str, record: dict) -> None:
        from peft import set_peft_model_state_dict

        config, loaded = self.config, self.model()
        folder = get(self.strategy).folder(self.run_dir) / self.group
        set_peft_model_state_dict(loaded.model, self.initial_state(loaded))
        to_examples = lambda rs: tokenize(rs, loaded.tokenizer, config.data.max_length, "response")
        result = train_adapter(loaded.model, to_examples(self.train), to_examples(self.validation), loaded.tokenizer.pad_token_id,
                               loaded.device, _plan(config, self.branch), folder, key, desc=f"{self.strategy} adapter {self.group}")
        record.update(result, outputs=[str((folder / "adapter_model.safetensors").relative_to(self.run_dir.root))])


def partition_groups(run: Run, config: RunConfig, records: list[Record], strategy: str) -> tuple[list[int], dict[str, tuple[list, list]]]:
    """(group of each training record, group name → (its training part, its validation share))."""
    labels, names = get(strategy).partition(run, config, records)
    held = validation_ids(records, config.data.validation_fraction, config.seed)
    groups = {}
    for group, name in enumerate(names):
        members = [r for r, l in zip(records, labels) if l == group]
        groups[name] = ([r for r in members if r.id not in held], [r for r in members if r.id in held])
    return labels, groups


def summarize_strategy(run: Run, config: RunConfig, records: list[Record], strategy: str, labels: list[int],
                       groups: dict[str, tuple[list, list]]) -> dict:
    """What each group's adapter cost and reached, from the adapters' manifest entries; writes `partition.json`. Rank 0 only.

    Whether an expert is kept, blended or dropped is decided later, on the validation records the
    router sends it (`keep.py`); a group with no training records has no adapter at all (`empty`).
    """
    names = list(groups)
    summary = {"groups": names, "sizes": np.bincount(labels, minlength=len(names)).tolist(), "experts": {},
               "empty": [name for name, (train, _) in groups.items() if not train]}
    for name in names:
        entry = run.stage_entry(f"experts/{strategy}/{name}") if name not in summary["empty"] else {}
        summary["experts"][name] = {k: entry.get(k) for k in ("samples", "validation_samples", "steps", "epochs_run", "best_epoch", "tokens",
                                                               "train_seconds", "initial_eval_loss", "best_eval_loss", "rank")}
    write_json(get(strategy).folder(run) / "partition.json", {"strategy": strategy, "groups": names, "empty": summary["empty"],
                                                              "assignment": {r.id: l for r, l in zip(records, labels)}})
    return summary


def decided(config: RunConfig, strategy: str) -> bool:
    """Whether a strategy's adapters are kept, blended or dropped on validation (`keep.py`): experts branched from the
    generalist are, unless `experts.keep: all`; the generalist itself, one-adapter controls and fixed-budget adapters are
    always served as trained."""
    experts = config.experts
    return experts.init == "generalist" and not get(strategy).one_adapter and not experts.equal_budget and experts.keep == "validation"


BLENDED = "blended"  # the sub-folder of a group's adapter holding its blend with the generalist


def served_groups(run: Run, strategy: str, apply_decisions: bool = True) -> dict[str, tuple[Path | None, float]]:
    """Each group's served adapter folder and its weight λ on the expert: the expert itself (λ = 1), its blend with the
    generalist (0 < λ < 1, `<group>/blended/`), or None (λ = 0: the generalist serves the group).

    `keep.json` (written by the keep stage) holds the decisions; without it (or with `apply_decisions` off, which the
    keep stage itself uses) every trained adapter is served as it is.
    """
    folder = get(strategy).folder(run)
    partition = json.loads((folder / "partition.json").read_text())
    keep_file = folder / "keep.json"
    decisions = json.loads(keep_file.read_text())["groups"] if apply_decisions and keep_file.exists() else {}
    served = {}
    for group in partition["groups"]:
        weight = 0.0 if group in partition.get("empty", []) else decisions.get(group, {}).get("lambda", 1.0)
        path = None if weight == 0 else folder / group if weight == 1 else folder / group / BLENDED
        served[group] = (path, weight)
    return served


def spread_over_ranks() -> bool:
    """Whether, under torchrun, each rank trains its share of the adapters (else rank 0 trains them all while the others wait).

    Trainer runs one-process jobs here (each adapter is small; DDP would synchronise every step for
    nothing), and in that mode it puts the model on cuda:0 and splits batches over every GPU the
    process sees. So adapters are spread only where that is the rank's own device: on CPUs, or
    where each process sees one GPU (e.g. CUDA_VISIBLE_DEVICES set per rank by the launcher).
    """
    return distributed.world()[1] > 1 and (not torch.cuda.is_available() or torch.cuda.device_count() == 1)


def train_experts(config: RunConfig, strategies: list[str] | None = None) -> dict:
    """`gradientspace train-experts RUN`: the Python API. The model is loaded only if some adapter must train.

    The generalist trains first (every expert branches from it); then every other adapter, under
    torchrun spread round-robin over the ranks (`spread_over_ranks`). Each rank writes only its own
    adapters' folders; rank 0 writes their manifest entries (gathered from the ranks), decides
    keep-or-fall-back and returns the summaries (the other ranks return {}).
    """
    run = Run(config.out)
    records = load_data(run, config)
    wanted = trained(strategies or config.experts.strategies)
    model = ModelOnDemand(config)
    models = {s: ModelOnDemand(replace(config, model=wide_model_config(config, cluster_count(run)))) if get(s).wide else model for s in wanted}
    partitions = {s: partition_groups(run, config, records, s) for s in wanted}
    jobs = [(s, name) for s in wanted for name, (train, _) in partitions[s][1].items() if train]

    def execute(job: tuple[str, str]) -> dict:
        strategy, name = job
        train, validation = partitions[strategy][1][name]
        branch = config.experts.init == "generalist" and not get(strategy).one_adapter
        return run.execute(AdapterStage(run, config, strategy, name, train, validation, models[strategy], branch))

    rank, world = distributed.world()
    spread = spread_over_ranks()
    if distributed.is_main():
        execute(jobs[0])  # the generalist: `trained` puts it first
    if spread:
        distributed.barrier()
        run.reload()  # the generalist's key: the experts' starting point
        ran = {f"experts/{s}/{n}": {**execute((s, n)), "rank": rank} for i, (s, n) in enumerate(jobs[1:]) if i % world == rank}
        gathered = distributed.gather_to_main(ran)
        if not distributed.is_main():
            return {}
        for other, entries in enumerate(gathered[1:], start=1):
            for stage, entry in entries.items():
                if entry.get("key") != run.stage_entry(stage).get("key") or not run.stage_entry(stage).get("done"):
                    runs.note(f"{stage}: trained on rank {other}")
                    run.record_stage(stage, entry)
    elif distributed.is_main():
        for job in jobs[1:]:
            execute(job)
    else:
        return {}
    summaries = {s: summarize_strategy(run, config, records, s, *partitions[s]) for s in wanted}
    run.reload()
    run.manifest.setdefault("experts", {}).update(summaries)
    run.save()
    return summaries
