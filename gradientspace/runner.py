"""The run object: one per command, handed to every stage; it alone builds stages.

`Run(config)` holds what every stage reads: the config, the run directory and its manifest
(`runs.RunDirectory`), the training records (loaded and split once), the model (loaded the first
time a stage needs it: a run whose stages are all done loads none) and the process group (rank,
world size). `run.build(stage)` builds a stage and, first, every stage it requires (each once per
command, in the order the stages ask for them); the key of a stage is its own inputs plus its
parents' keys, so a changed input re-runs exactly what reads it. Where a stage runs under
torchrun is the stage's `placement`, and where the other ranks wait is decided here:

| placement | who runs it | the other ranks |
| --- | --- | --- |
| `MAIN` | rank 0 | wait until rank 0 sends them its manifest (`RunDirectory.share_main`: sent, not re-read from a shared disk) |
| `EVERY` | every rank, on its own shard | meet at a barrier after it, then take rank 0's manifest |
| `SPREAD` | siblings built together are dealt by `work`, the most first to the least-loaded rank | rank 0 records the entries it gathers and sends its manifest |
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch

from gradientspace import distributed
from gradientspace.config import ConfigError, ModelConfig, RunConfig, keyed
from gradientspace.data.loading import fingerprint, load_records
from gradientspace.data.records import LoadReport, Record, validation_ids
from gradientspace.models.bank import AdapterBank
from gradientspace.models.loading import LoadedModel, load_base_for, load_tokenizer, pick_device, wrap_lora
from gradientspace.runs import Placement, RunDirectory, Stage, config_hash, content_key, note


def as_run(run: Run | RunConfig) -> Run:
    """The Python API takes a run object or a config: `train_experts(config)` alone, or several calls sharing one `Run`
    (its records loaded once, its model loaded once)."""
    return run if isinstance(run, Run) else Run(run)


class Run:
    """One command's run: config, directory, records, model and process group; builds the stages it is asked for."""

    def __init__(self, config: RunConfig):
        distributed.init()
        self.config = config
        self.rank, self.world_size = distributed.world()
        self.built: dict[str, dict] = {}  # stage name → manifest entry, for the stages this command has built
        self.base = None  # the process's one base model (`model.*`), loaded on first use; training and the bank wrap it
        self.trainable: LoadedModel | None = None  # the base wrapped with a fresh LoRA adapter of one shape
        self.trainable_shape: str | None = None
        self.adapter_bank: AdapterBank | None = None

    # ------------------------------------------------------------ what stages read

    @cached_property
    def directory(self) -> RunDirectory:
        """Opened on first use: `preflight` judges the output folder before anything reads it as a run."""
        return RunDirectory(self.config.out)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def path(self, *parts: str):
        return self.directory.path(*parts)

    def stage_entry(self, name: str) -> dict:
        """A stage's manifest entry (key, outputs, details) as the manifest holds it now; the same call as
        `RunDirectory.stage_entry`, so code can read a run whichever of the two it holds."""
        return self.directory.stage_entry(name)

    @cached_property
    def loaded_records(self) -> tuple[Sequence[Record], LoadReport]:
        data = self.config.data
        return load_records(
            data.path,
            skip_bad=data.skip_bad,
            limit=data.limit,
            per_source=data.per_source,
            seed=self.config.seed,
            columns=data.columns,
            num_proc=data.num_proc,
            subset=data.subset,
            split=data.split,
        )

    @property
    def records(self) -> Sequence[Record]:
        """Every training record, the validation split included, in the order the data stage wrote them."""
        return self.loaded_records[0]

    @cached_property
    def validation_ids(self) -> set[str]:
        """The validation split (`data.validation_fraction`): never trained on; every choice is made on it."""
        return validation_ids(self.records, self.config.data.validation_fraction, self.config.seed)

    @property
    def validation(self) -> list[Record]:
        return [r for r in self.records if r.id in self.validation_ids]

    @property
    def training(self) -> list[Record]:
        """The records adapters, routers and the warm-up train on: everything but the validation split."""
        return [r for r in self.records if r.id not in self.validation_ids]

    def base_model(self):
        """The base model of `model.*`, loaded once per process: the training adapters and the bank wrap it in turn."""
        if self.base is None:
            self.base = load_base_for(self.config.model)
        return self.base

    def model(self, model: ModelConfig | None = None) -> LoadedModel:
        """The base with a fresh LoRA adapter of `model.*`'s shape, or of another one (`single-wide`'s wider LoRA on the
        same base): wrapped on first use, and wrapped anew when another shape is asked for."""
        model = model or self.config.model
        shape = config_hash(keyed(model))
        if self.trainable_shape != shape:
            self._unwrap()
            device = pick_device(model.device)
            wrapped = wrap_lora(self.base_model(), model, self.config.seed)
            self.trainable, self.trainable_shape = LoadedModel(wrapped, load_tokenizer(model.name), device), shape
        return self.trainable

    def release_base(self) -> None:
        """Let go of the process's base model and what wraps it, for a stage that needs the memory for a model of its own
        (the FSDP-sharded gradient pass); the next stage that asks for the base loads it again."""
        self._unwrap()
        self.base = None
        gc.collect()  # peft's wrappers hold the base in reference cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _unwrap(self) -> None:
        """Give the base back from what wraps it now (a training adapter, or the bank's adapters), as it was loaded."""
        for holder in (self.trainable, self.adapter_bank):
            if holder is not None:
                holder.model.unload()
        self.trainable = self.trainable_shape = self.adapter_bank = None

    def bank(self, first_name: str, first_folder: Path) -> AdapterBank:
        """The process's one adapter bank (the base of `model.*`, loaded on first use), with `first_folder` loaded as
        `first_name`: every stage that scores or decodes shares it, adding the adapters it reads."""
        if self.adapter_bank is None:
            self._unwrap()  # every adapter is trained before anything is scored; a later training wraps the base anew
            self.adapter_bank = AdapterBank(self.config.model, first_name, first_folder, base=self.base_model())
        else:
            self.adapter_bank.load(first_name, first_folder)
        return self.adapter_bank

    def require_clustered(self, *stages: str) -> None:
        """For a command that reads the run's arrays beside its records (`export`, `select`): `stages` are finished, and
        the data file still holds the records the run was made from, so row i of an array is still record i."""
        for stage in stages:
            if not self.stage_entry(stage).get("done"):
                raise ConfigError(
                    f"{self.directory.root}: stage `{stage}` is not finished; run `gradientspace cluster` on it first"
                )
        data = self.config.data
        if self.stage_entry("data")["inputs"].get("data content") != fingerprint(data.path, data.subset, data.split):
            raise ConfigError(
                f"config key `data.path`: {data.path} holds other records than the run was made from; restore the file the run read"
            )

    # ------------------------------------------------------------ building

    def build(self, *targets: Stage) -> list[dict]:
        """Build `targets` and everything they require that is not done; returns their manifest entries."""
        pending = [stage for stage in targets if stage.name not in self.built]
        parents = {stage.name: self._build_parents(stage) for stage in pending}
        # a sibling built meanwhile, as another sibling's parent, is not dealt again
        spread = [
            s for s in pending if s.placement is Placement.SPREAD and self.world_size > 1 and s.name not in self.built
        ]
        for stage in pending:
            if stage not in spread and stage.name not in self.built:
                self.built[stage.name] = self._execute(stage, parents[stage.name])
        if spread:
            self._execute_spread(spread, parents)
        return [self.built[stage.name] for stage in targets]

    def _build_parents(self, stage: Stage) -> dict[str, str]:
        """Build every stage `stage` requires; returns their keys by name (the runner's part of `stage`'s inputs)."""
        keys: dict[str, str] = {}
        for item in stage.requires(self):
            group = item if isinstance(item, list) else [item]
            for parent, entry in zip(group, self.build(*group)):
                keys[f"stage {parent.name}"] = content_key(entry)
        return keys

    def _execute(self, stage: Stage, parent_keys: dict[str, str]) -> dict:
        if stage.placement is Placement.MAIN and self.world_size > 1:
            if self.is_main:
                self.directory.execute(stage, {**stage.inputs(self), **parent_keys}, self)
            self.directory.share_main()  # the other ranks wait here while rank 0 works, then take what it recorded
            return self.directory.stage_entry(stage.name)
        entry = self.directory.execute(stage, {**stage.inputs(self), **parent_keys}, self)
        if self.world_size > 1:  # EVERY: no rank reads the stage's outputs before every shard is in
            distributed.barrier()
            self.directory.share_main()
            return self.directory.stage_entry(stage.name)  # rank 0's, with the digests every rank's dependents key on
        return entry

    def _execute_spread(self, stages: list[Stage], parents: dict[str, dict[str, str]]) -> None:
        """Deal `stages` over the ranks, the most work first to the least-loaded rank (ties: in the order given, to the lowest
        rank); every rank computes the same deal. Rank 0 records the entries the others ran."""
        work = {
            stage.name: stage.work(self) for stage in stages
        }  # an adapter's work reads its group's records: once each
        load = [0.0] * self.world_size
        ran = {}
        for stage in sorted(
            stages, key=lambda s: -work[s.name]
        ):  # sorted() is stable: equal work keeps the given order
            rank = load.index(min(load))
            load[rank] += work[stage.name]
            if rank == self.rank:
                ran[stage.name] = {
                    **self.directory.execute(stage, {**stage.inputs(self), **parents[stage.name]}, self),
                    "rank": self.rank,
                }
        gathered = distributed.gather_to_main(ran)
        if self.is_main:
            for other, entries in enumerate(gathered[1:], start=1):
                for name, entry in entries.items():
                    current = self.directory.stage_entry(name)
                    # a rebuild under the same key (a changed output) is recorded too: its digests are new
                    if (
                        entry.get("key") != current.get("key")
                        or not current.get("done")
                        or entry.get("finished_at") != current.get("finished_at")
                    ):
                        note(f"{name}: ran on rank {other}")
                        self.directory.record_stage(name, entry)
        self.directory.share_main()
        for stage in stages:
            self.built[stage.name] = self.directory.stage_entry(stage.name)
