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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from gradientspace.clustering.stages import ClusterStage, DataStage, WarmupStage
from gradientspace.clustering.terms import cluster_terms
from gradientspace.config import RunConfig, keyed
from gradientspace.data.records import Record
from gradientspace.data.tokens import tokenize
from gradientspace.experts.strategies import GENERALIST, decides_on_validation, get, trained
from gradientspace.models.loading import LoadedModel
from gradientspace.models.train import TrainPlan, train_adapter
from gradientspace.runner import Run, as_run
from gradientspace.runs import Placement, Stage, add_to_section, config_hash, write_json


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


def _plan(config: RunConfig, branch: bool, logs: Path, data_parallel: bool) -> TrainPlan:
    experts = config.experts
    epochs = experts.branch_epochs if branch and not experts.equal_budget else experts.epochs
    return TrainPlan(
        epochs,
        experts.branch_learning_rate if branch else experts.learning_rate,
        experts.batch_size,
        config.seed,
        schedule=experts.schedule,
        warmup_ratio=experts.warmup_ratio,
        patience=None if experts.equal_budget else experts.patience,
        snapshot_epochs=tuple(experts.snapshot_epochs),
        report_to=tuple(config.train.report_to),
        activation_checkpointing=config.train.activation_checkpointing,
        logs=logs,
        data_parallel=data_parallel,
    )


class PartitionStage(Stage):
    """One strategy's groups of the training records (`partition.json`): the clusters, the labels, one group for everything…"""

    def __init__(self, strategy: str):
        self.strategy = get(strategy)
        self.name = f"partition/{strategy}"

    def requires(self, run: Run):
        # a partition that reads the clusters (or their K) is re-made when they change; the others read only the data
        return [self.strategy.partition_reads(ClusterStage(), DataStage())]

    def inputs(self, run: Run) -> dict[str, str]:
        return {
            "strategy": self.strategy.name,
            "partition settings": config_hash(asdict(run.config.cluster), run.config.seed),
        }

    def run(self, run: Run, key: str, record: dict) -> None:
        labels, names = self.strategy.partition(run, run.config, run.records)
        sizes = np.bincount(labels, minlength=len(names)).tolist()
        trained_groups = {label for r, label in zip(run.records, labels) if r.id not in run.validation_ids}
        empty = [name for group, name in enumerate(names) if group not in trained_groups]
        folder = self.strategy.folder(run)
        write_json(
            folder / "partition.json",
            {
                "strategy": self.strategy.name,
                "groups": names,
                "empty": empty,
                "assignment": {r.id: l for r, l in zip(run.records, labels)},
            },
        )
        terms = cluster_terms(run.records, labels, len(names), seed=run.config.seed)
        record.update(
            groups=names,
            sizes=sizes,
            empty=empty,
            terms={name: terms[str(group)] for group, name in enumerate(names)},
            outputs=[str((folder / "partition.json").relative_to(run.directory.root))],
        )


def read_partition(run: Run, strategy: str) -> dict:
    """A strategy's `partition.json` (its partition stage must have been built)."""
    return json.loads((get(strategy).folder(run) / "partition.json").read_text())


def group_records(run: Run, strategy: str, group: str) -> tuple[list[Record], list[Record]]:
    """(a group's training part, its validation share)."""
    partition = read_partition(run, strategy)
    number = partition["groups"].index(group)
    members = [r for r in run.records if partition["assignment"][r.id] == number]
    return [r for r in members if r.id not in run.validation_ids], [r for r in members if r.id in run.validation_ids]


class AdapterStage(Stage):
    """One adapter of one strategy: trained from its starting point on its group, stopped on the group's validation share."""

    def __init__(self, strategy: str, group: str):
        self.name = f"experts/{strategy}/{group}"
        self.strategy, self.group = strategy, group
        # an adapter on every record (the generalist, first, and single-continued) trains on every rank together
        # (data-parallel); an expert on one rank, any
        self.placement = Placement.EVERY if get(strategy).one_adapter_on_every_record else Placement.SPREAD

    def requires(self, run: Run):
        start = get(self.strategy).start(run.config)
        yield PartitionStage(self.strategy)
        if start == "generalist":
            yield AdapterStage(GENERALIST, "0")
        elif start == "warmup":
            yield WarmupStage()

    def work(self, run: Run) -> float:
        train, validation = group_records(run, self.strategy, self.group)
        return float(len(train) + len(validation))  # training epochs and validation passes both scale with the records

    def model_config(self, run: Run):
        """The model this adapter trains on: `single-wide`'s has rank K·r, so a changed K retrains it."""
        return get(self.strategy).model_config(run.config, run)

    def inputs(self, run: Run) -> dict[str, str]:
        # the generalist ignores how experts branch from it, and no adapter depends on which other strategies are asked for
        # nor on how its expert is kept or blended afterwards (`keep.py`)
        ignored = ("strategies", "keep", "blend_weights", "keep_confidence", "keep_min_records")
        ignored += get(self.strategy).ignored_settings()
        config = run.config
        train, validation = group_records(run, self.strategy, self.group)
        return {
            "model": config_hash(keyed(self.model_config(run))),
            "training settings": config_hash(
                {k: v for k, v in asdict(config.experts).items() if k not in ignored}, config.seed
            ),
            "training records": config_hash(sorted(r.id for r in train)),
            "validation records": config_hash(sorted(r.id for r in validation)),
        }

    def initial_state(self, run: Run, loaded: LoadedModel) -> dict[str, torch.Tensor]:
        start = get(self.strategy).start(run.config)
        if start == "fresh":
            return fresh_lora_state(loaded.model, run.config.seed)
        folder = run.path("warmup") if start == "warmup" else generalist_folder(run)
        return load_file(str(folder / "adapter_model.safetensors"))

    def run(self, run: Run, key: str, record: dict) -> None:
        from peft import set_peft_model_state_dict

        config, loaded = run.config, run.model(self.model_config(run))
        folder = get(self.strategy).folder(run) / self.group
        train, validation = group_records(run, self.strategy, self.group)
        set_peft_model_state_dict(loaded.model, self.initial_state(run, loaded))
        to_examples = lambda rs: tokenize(rs, loaded.tokenizer, config.data.max_length, "response")
        branch = get(self.strategy).start(config) == "generalist"
        result = train_adapter(
            loaded.model,
            to_examples(train),
            to_examples(validation),
            loaded.tokenizer.pad_token_id,
            loaded.device,
            _plan(
                config,
                branch,
                run.path("logs", self.strategy, self.group),
                data_parallel=self.placement is Placement.EVERY and run.world_size > 1,
            ),
            folder,
            key,
            desc=f"{self.strategy} adapter {self.group}",
        )
        record.update(result, outputs=[str((folder / "adapter_model.safetensors").relative_to(run.directory.root))])


class StrategyAdapters(Stage):
    """Every adapter of one strategy (a group with no training records has none: the generalist serves it), and what each
    cost and reached, in the manifest's `experts` section. Whether an expert is then kept, blended or dropped is decided on the
    validation records its strategy sends it (`keep.py`)."""

    def __init__(self, strategy: str):
        self.strategy = strategy
        self.name = f"adapters/{strategy}"

    def requires(self, run: Run):
        yield PartitionStage(self.strategy)
        yield self.adapters(run)

    def adapters(self, run: Run) -> list[AdapterStage]:
        """One stage per group that has training records; the partition must be built."""
        partition = read_partition(run, self.strategy)
        return [AdapterStage(self.strategy, group) for group in partition["groups"] if group not in partition["empty"]]

    def inputs(self, run: Run) -> dict[str, str]:
        return {}

    def run(self, run: Run, key: str, record: dict) -> None:
        partition = read_partition(run, self.strategy)
        names = partition["groups"]
        summary = {
            "groups": names,
            "sizes": np.bincount(list(partition["assignment"].values()), minlength=len(names)).tolist(),
            "experts": {},
            "empty": partition["empty"],
        }
        for name in names:
            entry = run.directory.stage_entry(f"experts/{self.strategy}/{name}") if name not in summary["empty"] else {}
            summary["experts"][name] = {
                k: entry.get(k)
                for k in (
                    "samples",
                    "validation_samples",
                    "steps",
                    "epochs_run",
                    "best_epoch",
                    "tokens",
                    "train_seconds",
                    "initial_eval_loss",
                    "best_eval_loss",
                    "rank",
                )
            }
        add_to_section(record, "experts", self.strategy, summary)
        record["summary"] = summary


def decided(config: RunConfig, strategy: str) -> bool:
    """Whether a strategy's adapters are kept, blended or dropped on validation (`keep.py`): experts branched from the
    generalist are, unless `experts.keep: all`; the generalist itself, one-adapter controls and fixed-budget adapters are
    always served as trained."""
    return get(strategy).start(config) == "generalist" and decides_on_validation(config)


BLENDED = "blended"  # the sub-folder of a group's adapter holding its blend with the fall-back adapter


def served_groups(run: Run, strategy: str, apply_decisions: bool = True) -> dict[str, tuple[Path | None, float]]:
    """Each group's served adapter folder and its weight λ on the expert: the expert itself (λ = 1), its blend with the
    fall-back adapter (0 < λ < 1, `<group>/blended/`), or None (λ = 0: the fall-back serves the group, `served_fallback`).

    `keep.json` (written by the keep stage) holds the decisions; without it (or with `apply_decisions` off, which the
    keep stage itself uses) every trained adapter is served as it is (`recorded_decisions`: never a stale file).
    """
    folder = get(strategy).folder(run)
    partition = json.loads((folder / "partition.json").read_text())
    decisions = recorded_decisions(run, strategy).get("groups", {}) if apply_decisions else {}
    served = {}
    for group in partition["groups"]:
        weight = 0.0 if group in partition.get("empty", []) else decisions.get(group, {}).get("lambda", 1.0)
        path = None if weight == 0 else folder / group if weight == 1 else folder / group / BLENDED
        served[group] = (path, weight)
    return served


def recorded_decisions(run: Run, strategy: str) -> dict:
    """`keep.json` as the keep stage wrote it, while the run's config decides the strategy (`decided`); {} otherwise —
    none written, or an earlier keep stage's, stale after a switch to `experts.keep: all`."""
    keep_file = get(strategy).folder(run) / "keep.json"
    return json.loads(keep_file.read_text()) if decided(run.config, strategy) and keep_file.exists() else {}


def recorded_fallback(run: Run, strategy: str) -> str:
    """The strategy whose adapter answers what `strategy` sends to none of its own, as its keep stage decided against it
    (`keep.json`'s `fallback`); the generalist wherever nothing is decided under the run's config."""
    return recorded_decisions(run, strategy).get("fallback", GENERALIST)


def served_fallback(run: Run, strategy: str) -> tuple[str, Path]:
    """(`recorded_fallback`, that adapter's served folder): `single-continued` as kept, or the generalist — also where the
    continued adapter was dropped."""
    owner = recorded_fallback(run, strategy)
    path = served_groups(run, owner)["0"][0] if owner != GENERALIST else None
    return (owner, path) if path is not None else (GENERALIST, generalist_folder(run))


def train_experts(run: Run | RunConfig, strategies: list[str] | None = None) -> dict:
    """`gradientspace train-experts RUN`: the Python API; each strategy's summary (on rank 0; {} on the others).

    The generalist trains first (every expert branches from it), data-parallel over the ranks under torchrun, and so do
    the other adapters on every record (`single-continued`, `single-wide`); the experts are dealt over the ranks, each a
    one-process Trainer job on its rank's own device (`models.train.OnOneDevice`: however many GPUs it sees). The model
    is loaded only if some adapter must train.
    """
    run = as_run(run)
    stages = [StrategyAdapters(s) for s in trained(strategies or run.config.experts.strategies, run.config)]
    run.build(*[PartitionStage(s.strategy) for s in stages])
    # every strategy's experts in one deal (the adapters on every record train on every rank together first)
    run.build(*[adapter for s in stages for adapter in s.adapters(run)])
    entries = run.build(*stages)
    return {s.strategy: entry["summary"] for s, entry in zip(stages, entries)} if run.is_main else {}
