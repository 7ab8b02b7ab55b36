"""Routed inference and the comparison strategies: the adapter bank with every strategy's adapters and what the strategies read.

The strategies themselves (what each partitions and how it picks an adapter per prompt) are the
objects of `strategies.STRATEGIES`; the bank (`bank.py`) scores and decodes; this module puts them
together, and holds what the pipeline computes from them: the ensemble's centroids, the gradient
oracle's space, the validation-chosen router threshold and the adapters a server answers with.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from gradientspace.config import RunConfig
from gradientspace.data.records import Record
from gradientspace.data.tokens import collate, tokenize
from gradientspace.experts.adapters import generalist_folder, recorded_fallback, served_fallback, served_groups
from gradientspace.experts.strategies import (
    BELOW_THRESHOLD,
    GENERALIST,
    NOT_SERVED,
    ROUTED,
    ROUTER_UNSURE,
    Choice,
    get,
)
from gradientspace.gradients.engine import PerSampleGradients, transform
from gradientspace.models.bank import FirstToken
from gradientspace.routing.router import Router, threshold_override
from gradientspace.runner import Run, as_run

WARMUP = "warmup"


@dataclass
class Generation:
    text: str
    expert: int | str
    probability: float
    routing_seconds: float
    first_token_seconds: float
    new_tokens: int
    decode_seconds: float = 0.0
    adapter: str | None = None  # the adapter that answered (None: a mixture of adapters)
    fallback: str | None = None  # why the fall-back answered instead of the group's own adapter (`Choice.fallback`)


class StrategyModel:
    """An adapter bank holding the generalist and every adapter of the requested strategies, and what the strategies'
    `choose` reads beside them (routers, the gradient oracle's space, the ensemble's centroids), loaded as each asks.

    Every adapter is loaded as served (kept, blended or dropped, `keep.json`), and each strategy falls back to the adapter
    its keep stage decided against (`keep.json`), but `undecided`: the keep stage deciding that strategy reads its adapters
    as trained and its fall-back as the config says (`Strategy.falls_back_to`)."""

    def __init__(
        self,
        run: Run | RunConfig,
        strategies: list[str],
        adapter_epoch: int | None = None,
        undecided: str | None = None,
    ):
        command = as_run(run)  # a config alone (serve, generate): a run object of its own, with its own bank
        self.config, self.run = command.config, command
        suffix = f"epoch-{adapter_epoch}" if adapter_epoch else ""
        generalist = generalist_folder(self.run) / suffix
        if not (generalist / "adapter_model.safetensors").exists():
            raise FileNotFoundError(
                f"{generalist} has no adapter: run `gradientspace train-experts` (the generalist `single` is trained first)"
            )
        self.generalist = self.adapter_name(GENERALIST, "0")
        self.bank = command.bank(
            self.generalist, generalist
        )  # the command's one bank: the base loaded once per process
        self.folders: dict[str, Path] = {self.generalist: generalist}  # adapter name → the folder it was loaded from
        self.groups: dict[str, list[str]] = {}
        self.routers: dict[str, Router] = {}
        self.oracle_space: tuple[torch.Tensor, torch.Tensor] | None = None
        self.centroids: torch.Tensor | None = None
        owners = list(dict.fromkeys(get(s).owner for s in strategies))
        self.fallbacks = {
            o: get(o).falls_back_to(self.config) if o == undecided else recorded_fallback(self.run, o) for o in owners
        }
        loaded = list(dict.fromkeys([GENERALIST, *self.fallbacks.values(), *owners]))
        for strategy in loaded:
            folder = get(strategy).folder(self.run)
            if not (folder / "partition.json").exists():
                raise FileNotFoundError(
                    f"{folder} has no experts: run `gradientspace train-experts` with `{strategy}` among experts.strategies"
                )
            self.groups[strategy] = json.loads((folder / "partition.json").read_text())["groups"]
            for group, (path, _) in served_groups(self.run, strategy, apply_decisions=strategy != undecided).items():
                name = self.adapter_name(strategy, group)
                if path is not None and (path / suffix / "adapter_model.safetensors").exists():
                    self.bank.load(name, path / suffix)
                    self.folders[name] = path / suffix
        for strategy in dict.fromkeys(loaded + list(strategies)):
            get(strategy).prepare(self)

    # the bank's parts, read by the keep stage, the server and the tests
    device = property(lambda self: self.bank.device)
    tokenizer = property(lambda self: self.bank.tokenizer)
    eos_ids = property(lambda self: self.bank.eos_ids)

    @property
    def model(self):
        return self.bank.model

    @model.setter
    def model(self, value) -> None:
        self.bank.model = value

    # ---------------------------------------------------------------- what strategies load (`Strategy.prepare`)

    def load_router(self, strategy: str) -> None:
        if strategy not in self.routers:
            self.routers[strategy] = Router.load(
                get(strategy).router_folder(self.run), self.device, threshold=threshold_override(self.config)
            )

    def load_gradient_oracle(self) -> None:
        if self.oracle_space is None:
            self.bank.load(WARMUP, self.run.path("warmup"))
            self.oracle_space = gradient_cluster_space(self.run)

    def load_centroids(self) -> None:
        if self.centroids is None:
            self.centroids = load_file(str(self.run.path("elrea", "centroids.safetensors")))["centroids"].to(
                self.device
            )

    def load_folder(self, folder: Path) -> str:
        """The adapter loaded from `folder`, loaded first where none was (an adapter that is not served: a dropped expert)."""
        name = next((n for n, loaded in self.folders.items() if loaded.resolve() == folder.resolve()), None)
        if name is None:
            name = f"unserved__{len(self.folders)}"
            self.bank.load(name, folder)
            self.folders[name] = folder
        return name

    @staticmethod
    def adapter_name(strategy: str, group: str) -> str:
        return f"{strategy}__{group}"

    def adapter_for(self, strategy: str, group: int) -> str:
        """The adapter serving one group: its expert, or the fall-back (router unsure, expert not kept, empty group)."""
        own = self.own_adapter(strategy, group)
        return own if own is not None else self.fallback_for(strategy)

    def own_adapter(self, strategy: str, group: int) -> str | None:
        """A group's own adapter, as served; None where the fall-back answers it."""
        if group == ROUTER_UNSURE:
            return None
        name = self.adapter_name(strategy, self.groups[strategy][group])
        return name if name in self.folders else None  # loaded for this model (the shared bank holds others')

    def fallback_for(self, strategy: str) -> str:
        """The adapter answering what `strategy` sends to none of its own (`recorded_fallback`): the single adapter of
        record, `single-continued` as kept (the generalist where it was dropped), or the generalist."""
        owner = self.fallbacks.get(get(strategy).owner, GENERALIST)
        return self.generalist if owner in (GENERALIST, strategy) else self.adapter_for(owner, 0)

    def serve_group(self, strategy: str, group: int, probability: float = 1.0, pick: int | None = None) -> Choice:
        """One prompt sent to `group` of `strategy` (ROUTER_UNSURE: its router was unsure): its adapter, or the fall-back and why."""
        own = self.own_adapter(strategy, group)
        reason = None if own is not None else BELOW_THRESHOLD if group == ROUTER_UNSURE else NOT_SERVED
        return Choice({own or self.fallback_for(strategy): 1.0}, group, probability, pick, reason)

    def choose(self, strategy: str, records: list[Record]) -> tuple[list[Choice], float]:
        """How each prompt is served, and the seconds spent deciding (routing / gradient)."""
        start = time.perf_counter()
        choices = get(strategy).choose(self, records)
        return choices, time.perf_counter() - start

    def gradients(
        self, records: list[Record], adapter: str, tokens: str, adam=None, normalize: bool = True
    ) -> torch.Tensor:
        """Per-record LoRA gradients w.r.t. one adapter (the engine of the clustering pass), one row per record."""
        self.model.set_adapter(adapter)
        examples = tokenize(records, self.tokenizer, self.config.data.max_length, tokens)
        rows = []
        with PerSampleGradients(self.model) as engine:
            for start in range(0, len(examples), 8):
                input_ids, mask, labels = (
                    t.to(self.device) for t in collate(examples[start : start + 8], self.tokenizer.pad_token_id)
                )
                grads, _ = engine.batch(input_ids, mask, labels)
                rows.append(transform(grads, adam, normalize=normalize))
        # a rank's shard of a split smaller than the world may hold no records: no rows, of the gradients' width
        return torch.cat(rows) if rows else torch.zeros(0, engine.layout.dim, device=self.device)

    def prompt_gradients(self, records: list[Record]) -> torch.Tensor:
        """Unit-norm instruction-token gradients w.r.t. the generalist (ELREA's base adapter), one row per prompt."""
        return self.gradients(records, self.generalist, "instruction")

    def gradient_oracle_groups(self, records: list[Record]) -> list[int]:
        """Each record's gradient cluster from its own response gradient, as the clustering pass computed it."""
        return (self.sketch_coordinates(records) @ self.oracle_space[1].T).argmax(dim=1).tolist()

    def has_sketch_space(self) -> bool:
        return self.run.path("clusters.jsonl").exists() and self.run.path("sketch.safetensors").exists()

    def sketch_coordinates(self, records: list[Record]) -> torch.Tensor:
        """Each record's own response gradient (w.r.t. the warm-up adapter, transformed as the clustering pass did) on the
        sketch basis, unit norm, [records, r] float64: the space the gradient clusters were found in."""
        from gradientspace.gradients.engine import layout_of
        from gradientspace.models.train import load_adam_state

        self.load_gradient_oracle()
        gradients = self.config.gradients
        self.model.set_adapter(WARMUP)
        adam = (
            load_adam_state(self.run.path("warmup", "optimizer.safetensors"), layout_of(self.model), self.device)
            if gradients.adam_precondition
            else None
        )
        grads = self.gradients(records, WARMUP, gradients.tokens, adam, gradients.normalize)
        return torch.nn.functional.normalize(grads.double().cpu() @ self.oracle_space[0], dim=1)

    # ------------------------------------------------------------------ scoring

    def nll(self, strategy: str, records: list[Record], batch_size: int = 8) -> list[float]:
        """Teacher-forced mean response-token NLL per record under the strategy."""
        choices, _ = self.choose(strategy, records)
        return self.nll_for_choices(choices, records, batch_size)

    def nll_for_choices(self, choices: list[Choice], records: list[Record], batch_size: int = 8) -> list[float]:
        """Teacher-forced mean response-token NLL per record, each served as its `Choice` says: the records of one adapter
        `batch_size` at a time, a mixture's one by one (its weights are its own)."""
        examples = tokenize(records, self.tokenizer, self.config.data.max_length, "response")
        pad = self.tokenizer.pad_token_id
        losses = [0.0] * len(records)
        by_adapter: dict[str | None, list[int]] = {}
        for i, choice in enumerate(choices):
            by_adapter.setdefault(choice.single_adapter, []).append(i)
        for adapter, members in by_adapter.items():
            for start in range(0, len(members), batch_size if adapter is not None else 1):
                batch = members[start : start + (batch_size if adapter is not None else 1)]
                input_ids, mask, labels = (t.to(self.device) for t in collate([examples[i] for i in batch], pad))
                if adapter is None:
                    values = self.bank.mixture_nll(choices[batch[0]].weights, input_ids, mask, labels)
                else:
                    values = self.bank.nll(adapter, input_ids, mask, labels)
                for i, value in zip(batch, values):
                    losses[i] = value
        return losses

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        strategy: str,
        records: list[Record],
        max_new_tokens: int = 128,
        progress: bool = False,
        batch_size: int = 8,
    ) -> list[Generation]:
        """Route, then decode each prompt with its adapter(s) (`AdapterBank.decode`; a mixture: `decode_mixture`).

        Prompts that share one adapter are decoded together, `batch_size` at a time; every ensemble
        prompt, whose mixing weights are its own, alone. A batch's generations report its seconds.
        """
        from transformers import StoppingCriteriaList

        from gradientspace.data.tokens import prompt_text

        results: list[Generation | None] = [None] * len(records)
        choices, routing_seconds = self.choose(strategy, records)
        per_prompt_routing = routing_seconds / max(len(records), 1)
        prompts = [
            self.tokenizer(prompt_text(self.tokenizer, r), add_special_tokens=False)["input_ids"] for r in records
        ]
        by_adapter: dict[str | None, list[int]] = {}
        for i, choice in enumerate(choices):
            by_adapter.setdefault(choice.single_adapter, []).append(i)
        bar = tqdm(
            total=len(records),
            desc=f"generate ({strategy})",
            dynamic_ncols=True,
            **({} if progress else {"disable": True}),
        )
        for adapter, members in by_adapter.items():
            step = batch_size if adapter is not None else 1
            for start in range(0, len(members), step):
                batch = members[start : start + step]
                if adapter is None:
                    new, first, total = self.bank.decode_mixture(
                        choices[batch[0]].weights, prompts[batch[0]], max_new_tokens
                    )
                    rows = [new]
                else:
                    clock = FirstToken()
                    rows = self.bank.decode(
                        [prompts[i] for i in batch],
                        [adapter] * len(batch),
                        max_new_tokens,
                        StoppingCriteriaList([clock]),
                    )
                    first, total = clock.seconds(), time.perf_counter() - clock.start
                for i, new in zip(batch, rows):
                    results[i] = Generation(
                        self.tokenizer.decode(new, skip_special_tokens=True),
                        choices[i].expert,
                        choices[i].probability,
                        per_prompt_routing,
                        first,
                        len(new),
                        total,
                        adapter,
                        choices[i].fallback,
                    )
                bar.update(len(batch))
        bar.close()
        return results


def gradient_cluster_space(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """(sketch basis [d, r], unit centroids of the gradient clusters in sketch coordinates [K, r]), in float64.

    The same space spherical k-means clustered: a training sample's coordinates are Uᵀg, so a new
    record's projected gradient lands next to the samples whose gradients it resembles.
    """
    sketch = load_file(str(run.path("sketch.safetensors")))
    labels = torch.tensor([json.loads(line)["cluster"] for line in run.path("clusters.jsonl").read_text().splitlines()])
    unit = torch.nn.functional.normalize(sketch["coordinates"].double(), dim=1)
    k = int(labels.max()) + 1
    centroids = torch.stack(
        [
            unit[labels == c].mean(dim=0) if (labels == c).any() else torch.zeros(unit.shape[1], dtype=unit.dtype)
            for c in range(k)
        ]
    )
    return sketch["basis"].double(), torch.nn.functional.normalize(centroids, dim=1)


# ------------------------------------------------------------------ serving: what a routed server answers with

GENERALIST_MODEL = "generalist"


@dataclass
class ServedAdapter:
    """One adapter behind a routed server: its public model id, the router output it answers, its peft folder."""

    name: str
    expert: int
    folder: Path

    @property
    def is_fallback(self) -> bool:
        return self.expert == ROUTER_UNSURE


def served_adapters(run: Run, strategy: str = ROUTED) -> list[ServedAdapter]:
    """Every expert that is served (kept, or blended with the fall-back), then the fall-back that answers every other router
    output: public id `generalist`, or the name of the strategy whose adapter it is (`single-continued`).

    The fall-back's folder is the adapter `StrategyModel` falls back to (`serving_names` and the
    serving tests check the two agree), so `serve`, `route` and `backend-command` need no model.
    """
    folder = get(strategy).folder(run)
    if not (folder / "partition.json").exists():
        raise FileNotFoundError(f"{folder} has no experts: run `gradientspace train-experts {run.config.out}` first")
    experts = [
        ServedAdapter(f"expert-{group}", i, path)
        for i, (group, (path, _)) in enumerate(served_groups(run, strategy).items())
        if path is not None and (path / "adapter_model.safetensors").exists()
    ]
    owner, fallback = served_fallback(run, strategy)
    return experts + [ServedAdapter(GENERALIST_MODEL if owner == GENERALIST else owner, ROUTER_UNSURE, fallback)]


def serving_names(model: StrategyModel, strategy: str = ROUTED) -> dict[str, str]:
    """Public model id → the adapter `model` loaded for it, for every served adapter."""
    owner = get(strategy).owner
    return {served.name: model.adapter_for(owner, served.expert) for served in served_adapters(model.run, owner)}
