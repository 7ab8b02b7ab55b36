"""Routed inference and the comparison strategies, on one base model holding every adapter.

The strategies themselves (what each partitions and how it picks an adapter per prompt) are the
objects of `strategies.STRATEGIES`; this module holds what they run on.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from gradientspace.config import RunConfig
from gradientspace.data.records import Record, collate, tokenize
from gradientspace.experts.adapters import generalist_folder, served_groups
from gradientspace.gradients.engine import PerSampleGradients, per_sample_mean_loss, response_losses, transform
from gradientspace.models.loading import end_of_turn_ids, load_base_model, load_tokenizer, pick_device
from gradientspace.routing.router import Router, threshold_override
from gradientspace.runs import RunDirectory, atomic_path, write_json
from gradientspace.experts.strategies import GENERALIST, ROUTER_UNSURE, Choice, get, trained

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


class StrategyModel:
    """The base model with the generalist and every adapter of the requested strategies."""

    def __init__(self, config: RunConfig, strategies: list[str], adapter_epoch: int | None = None, apply_decisions: bool = True):
        from peft import PeftModel

        self.config, self.run = config, RunDirectory(config.out)
        self.device = pick_device(config.model.device)
        self.tokenizer = load_tokenizer(config.model.name)
        base = load_base_model(config.model.name, self.device)
        self.eos_ids = end_of_turn_ids(self.tokenizer, base.generation_config)  # decoding here and in `serve` stops at these
        # transformers 5 renamed `past_key_values` to `cache` (the old name goes in 5.40); 4.x knows only the old one
        self.cache_name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        suffix = f"epoch-{adapter_epoch}" if adapter_epoch else ""
        generalist = generalist_folder(self.run) / suffix
        if not (generalist / "adapter_model.safetensors").exists():
            raise FileNotFoundError(f"{generalist} has no adapter: run `gradientspace train-experts` (the generalist `single` is trained first)")
        self.generalist = self.adapter_name(GENERALIST, "0")
        self.model = PeftModel.from_pretrained(base, str(generalist), adapter_name=self.generalist).eval()
        self.groups: dict[str, list[str]] = {}
        self.routers: dict[str, Router] = {}
        for strategy in trained(strategies):
            folder = get(strategy).folder(self.run)
            if not (folder / "partition.json").exists():
                raise FileNotFoundError(f"{folder} has no experts: run `gradientspace train-experts` with `{strategy}` among experts.strategies")
            self.groups[strategy] = json.loads((folder / "partition.json").read_text())["groups"]
            for group, (path, _) in served_groups(self.run, strategy, apply_decisions).items():
                name = self.adapter_name(strategy, group)
                if path is not None and name not in self.model.peft_config and (path / suffix / "adapter_model.safetensors").exists():
                    self.model.load_adapter(str(path / suffix), adapter_name=name)
            if get(strategy).routed:
                self.routers[strategy] = Router.load(get(strategy).router_folder(self.run), self.device, threshold=threshold_override(config))
        self.oracle_space = None
        if "gradient-oracle" in strategies:
            self.model.load_adapter(str(self.run.path("warmup")), adapter_name=WARMUP)
            self.oracle_space = gradient_cluster_space(self.run)
        self.model.eval()
        self.centroids = None
        if any(get(s).needs_cluster_centroids for s in strategies):
            self.centroids = load_file(str(self.run.path("elrea", "centroids.safetensors")))["centroids"].to(self.device)

    @staticmethod
    def adapter_name(strategy: str, group: str) -> str:
        return f"{strategy}__{group}"

    def adapter_for(self, strategy: str, group: int) -> str:
        """The adapter serving one group: its expert, or the generalist (router unsure, expert fell back, empty group)."""
        if group == ROUTER_UNSURE:
            return self.generalist
        name = self.adapter_name(strategy, self.groups[strategy][group])
        return name if name in self.model.peft_config else self.generalist

    def choose(self, strategy: str, records: list[Record]) -> tuple[list[Choice], float]:
        """How each prompt is served, and the seconds spent deciding (routing / gradient)."""
        start = time.perf_counter()
        choices = get(strategy).choose(self, records)
        return choices, time.perf_counter() - start

    def gradients(self, records: list[Record], adapter: str, tokens: str, adam=None, normalize: bool = True) -> torch.Tensor:
        """Per-record LoRA gradients w.r.t. one adapter (the engine of the clustering pass), one row per record."""
        self.model.set_adapter(adapter)
        examples = tokenize(records, self.tokenizer, self.config.data.max_length, tokens)
        rows = []
        with PerSampleGradients(self.model) as engine:
            for start in range(0, len(examples), 8):
                input_ids, mask, labels = (t.to(self.device) for t in collate(examples[start:start + 8], self.tokenizer.pad_token_id))
                grads, _ = engine.batch(input_ids, mask, labels)
                rows.append(transform(grads, adam, normalize=normalize))
        return torch.cat(rows)

    def prompt_gradients(self, records: list[Record]) -> torch.Tensor:
        """Unit-norm instruction-token gradients w.r.t. the generalist (ELREA's base adapter), one row per prompt."""
        return self.gradients(records, self.generalist, "instruction")

    def gradient_oracle_groups(self, records: list[Record]) -> list[int]:
        """Each record's gradient cluster from its own response gradient, as the clustering pass computed it."""
        from gradientspace.gradients.engine import layout_of
        from gradientspace.experts.train import load_adam_state

        gradients = self.config.gradients
        self.model.set_adapter(WARMUP)
        adam = load_adam_state(self.run.path("warmup", "optimizer.safetensors"), layout_of(self.model), self.device) if gradients.adam_precondition else None
        grads = self.gradients(records, WARMUP, gradients.tokens, adam, gradients.normalize)
        basis, centroids = self.oracle_space
        coordinates = torch.nn.functional.normalize(grads.double().cpu() @ basis, dim=1)
        return (coordinates @ centroids.T).argmax(dim=1).tolist()

    def ensemble_choices(self, records: list[Record]) -> list[Choice]:
        grads = self.prompt_gradients(records)
        centroids = torch.nn.functional.normalize(self.centroids, dim=1)
        similarity = grads @ centroids.T  # [prompts, K + 1]; the last centroid is the warm-up's (all data)
        z = (similarity - similarity.mean(dim=1, keepdim=True)) / similarity.std(dim=1, keepdim=True).clamp(min=1e-8)
        weights = torch.softmax(z / self.config.evaluate.elrea_temperature, dim=1).cpu()
        names = [self.adapter_for("routed", g) for g in range(len(self.groups["routed"]))] + [self.generalist]
        choices = []
        for row in weights:
            mix: dict[str, float] = {}
            for name, weight in zip(names, row.tolist()):
                mix[name] = mix.get(name, 0.0) + weight
            top = int(row.argmax())
            choices.append(Choice(mix, top if top < len(names) - 1 else ROUTER_UNSURE, float(row.max())))
        return choices

    # ------------------------------------------------------------------ scoring

    def _mixed_logits(self, weights: dict[str, float], input_ids, mask, past=None):
        """Weighted sum of next-token logits over adapters (one adapter: its logits)."""
        logits, caches = None, {}
        for name, weight in weights.items():
            self.model.set_adapter(name)
            cache = {self.cache_name: (past or {}).get(name)}
            out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=past is not None, **cache)
            part = out.logits.float() * weight
            logits = part if logits is None else logits + part
            caches[name] = getattr(out, self.cache_name)
        return logits, caches

    def nll(self, strategy: str, records: list[Record], batch_size: int = 8) -> list[float]:
        """Teacher-forced mean response-token NLL per record under the strategy."""
        choices, _ = self.choose(strategy, records)
        return self.nll_for_choices(choices, records, batch_size)

    @torch.no_grad()
    def nll_for_choices(self, choices: list[Choice], records: list[Record], batch_size: int = 8) -> list[float]:
        """Teacher-forced mean response-token NLL per record, each served as its `Choice` says."""
        examples = tokenize(records, self.tokenizer, self.config.data.max_length, "response")
        losses = [0.0] * len(records)
        groups: dict[tuple, list[int]] = {}
        for i, choice in enumerate(choices):
            groups.setdefault(tuple(sorted(choice.weights.items())) if choice.single_adapter is None else (choice.single_adapter,), []).append(i)
        for key, members in groups.items():
            for start in range(0, len(members), batch_size):
                batch = members[start:start + batch_size]
                input_ids, mask, labels = (t.to(self.device) for t in collate([examples[i] for i in batch], self.tokenizer.pad_token_id))
                if choices[batch[0]].single_adapter is None:  # ensemble: weights differ per prompt, score one by one
                    for i in batch:
                        ids, m, lab = (t.to(self.device) for t in collate([examples[i]], self.tokenizer.pad_token_id))
                        logits, _ = self._mixed_logits(choices[i].weights, ids, m)
                        losses[i] = float(per_sample_mean_loss(logits, lab)[0])
                    continue
                self.model.set_adapter(choices[batch[0]].single_adapter)
                for i, loss in zip(batch, response_losses(self.model, input_ids, mask, labels).tolist()):
                    losses[i] = loss
        return losses

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def _greedy(self, weights: dict[str, float], prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float, float]:
        """Greedy decoding with a KV cache per adapter; returns (new tokens, first-token seconds, total seconds)."""
        start = time.perf_counter()
        ids = torch.tensor([prompt_ids], device=self.device)
        mask = torch.ones_like(ids)
        past: dict = {name: None for name in weights}
        new: list[int] = []
        first = 0.0
        step_input = ids
        for _ in range(max_new_tokens):
            logits, past = self._mixed_logits(weights, step_input, mask, past=past)
            token = int(logits[0, -1].argmax())
            if not new:
                first = time.perf_counter() - start
            if token in self.eos_ids:
                break
            new.append(token)
            step_input = torch.tensor([[token]], device=self.device)
            mask = torch.cat([mask, torch.ones_like(step_input)], dim=1)
        return new, first, time.perf_counter() - start

    @torch.no_grad()
    def _greedy_batch(self, adapter: str, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], float]:
        """Greedy decoding of prompts that share one adapter, left-padded into one batch (transformers' generate)."""
        start = time.perf_counter()
        self.model.set_adapter(adapter)
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=sorted(self.eos_ids), pad_token_id=pad)
        rows = []
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in self.eos_ids), len(row))
            rows.append(row[:end])
        return rows, time.perf_counter() - start

    def generate(self, strategy: str, records: list[Record], max_new_tokens: int = 128, progress: bool = False,
                 batch_size: int = 8) -> list[Generation]:
        """Route, then decode each prompt with its adapter(s).

        Prompts that share one adapter are decoded together, `batch_size` at a time; a single prompt
        (and every ensemble prompt, whose mixing weights are its own) is decoded alone, which is what
        per-request latency measures. Batched generations report their batch's seconds.
        """
        from gradientspace.data.records import prompt_text

        results: list[Generation | None] = [None] * len(records)
        choices, routing_seconds = self.choose(strategy, records)
        per_prompt_routing = routing_seconds / max(len(records), 1)
        prompts = [self.tokenizer(prompt_text(self.tokenizer, r), add_special_tokens=False)["input_ids"] for r in records]
        by_adapter: dict[str | None, list[int]] = {}
        for i, choice in enumerate(choices):
            by_adapter.setdefault(choice.single_adapter, []).append(i)
        bar = tqdm(total=len(records), desc=f"generate ({strategy})", dynamic_ncols=True, **({} if progress else {"disable": True}))
        for adapter, members in by_adapter.items():
            step = batch_size if adapter is not None else 1
            for start in range(0, len(members), step):
                batch = members[start:start + step]
                if len(batch) == 1:
                    new, first, total = self._greedy(choices[batch[0]].weights, prompts[batch[0]], max_new_tokens)
                    rows, firsts, totals = [new], [first], [total]
                else:
                    rows, total = self._greedy_batch(adapter, [prompts[i] for i in batch], max_new_tokens)
                    firsts, totals = [total] * len(batch), [total] * len(batch)
                for i, new, first, total in zip(batch, rows, firsts, totals):
                    results[i] = Generation(self.tokenizer.decode(new, skip_special_tokens=True), choices[i].expert, choices[i].probability,
                                            per_prompt_routing, first, len(new), total)
                bar.update(len(batch))
        bar.close()
        return results


def compute_elrea_centroids(config: RunConfig, records: list[Record]) -> Path:
    """Mean unit instruction-token gradient (w.r.t. the generalist, ELREA's base) of each gradient cluster, plus of all data."""
    from peft import PeftModel

    run = RunDirectory(config.out)
    path = run.path("elrea", "centroids.safetensors")
    partition = json.loads((get("routed").folder(run) / "partition.json").read_text())
    groups, labels = partition["groups"], [partition["assignment"][r.id] for r in records]
    device = pick_device(config.model.device)
    tokenizer = load_tokenizer(config.model.name)
    model = PeftModel.from_pretrained(load_base_model(config.model.name, device), str(generalist_folder(run))).eval()
    examples = tokenize(records, tokenizer, config.data.max_length, "instruction")
    sums = None
    with PerSampleGradients(model) as engine:
        for start in tqdm(range(0, len(examples), 8), desc="elrea centroids", dynamic_ncols=True):
            batch = examples[start:start + 8]
            grads, _ = engine.batch(*(t.to(device) for t in collate(batch, tokenizer.pad_token_id)))
            grads = transform(grads, None, normalize=True)
            if sums is None:
                sums = torch.zeros(len(groups) + 1, grads.shape[1], device=device, dtype=torch.float64)
            for example, row in zip(batch, grads):
                sums[labels[example.index]] += row
                sums[-1] += row
    counts = torch.bincount(torch.tensor(labels), minlength=len(groups)).tolist() + [len(records)]
    centroids = (sums / torch.tensor(counts, device=device, dtype=torch.float64).clamp(min=1).unsqueeze(1)).float().cpu()
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"centroids": centroids.contiguous()}, str(tmp))
    return path


def gradient_cluster_space(run: RunDirectory) -> tuple[torch.Tensor, torch.Tensor]:
    """(sketch basis [d, r], unit centroids of the gradient clusters in sketch coordinates [K, r]), in float64.

    The same space spherical k-means clustered: a training sample's coordinates are Uᵀg, so a new
    record's projected gradient lands next to the samples whose gradients it resembles.
    """
    sketch = load_file(str(run.path("sketch.safetensors")))
    labels = torch.tensor([json.loads(line)["cluster"] for line in run.path("clusters.jsonl").read_text().splitlines()])
    unit = torch.nn.functional.normalize(sketch["coordinates"].double(), dim=1)
    k = int(labels.max()) + 1
    centroids = torch.stack([unit[labels == c].mean(dim=0) if (labels == c).any() else torch.zeros(unit.shape[1], dtype=unit.dtype)
                             for c in range(k)])
    return sketch["basis"].double(), torch.nn.functional.normalize(centroids, dim=1)


def best_threshold(top_probabilities: list[float], expert_nll: list[float], generalist_nll: list[float]) -> tuple[float, float]:
    """(threshold, mean NLL) minimising the validation NLL of "expert if probability ≥ threshold, else generalist".

    Candidates are 0 (always the expert) and every observed probability, plus one above them all
    (always the generalist); ties go to the lowest threshold, which trusts the router most.
    """
    candidates = sorted({0.0, *top_probabilities, 1.0 + 1e-9})
    def mean_nll(threshold: float) -> float:
        chosen = [e if p >= threshold else g for p, e, g in zip(top_probabilities, expert_nll, generalist_nll)]
        return sum(chosen) / max(len(chosen), 1)
    scored = [(round(mean_nll(t), 10), t) for t in candidates]
    value, threshold = min(scored, key=lambda pair: (pair[0], pair[1]))
    return threshold, value


def calibrate_threshold(config: RunConfig, strategy: str, validation: list[Record]) -> dict:
    """Choose the router threshold on the validation split and store it in the router's `router.json`."""
    run = RunDirectory(config.out)
    folder = get(strategy).router_folder(run)
    info = json.loads((folder / "router.json").read_text())
    engine = StrategyModel(config, [strategy])
    probabilities = engine.routers[strategy].probabilities([r.prompt_text for r in validation])
    top, choice = probabilities.max(dim=1)
    experts = [Choice({engine.adapter_for(strategy, int(c)): 1.0}, int(c), float(p)) for c, p in zip(choice, top)]
    generalist = [Choice({engine.generalist: 1.0}, ROUTER_UNSURE, 1.0) for _ in validation]
    expert_nll, generalist_nll = engine.nll_for_choices(experts, validation), engine.nll_for_choices(generalist, validation)
    threshold, value = best_threshold(top.tolist(), expert_nll, generalist_nll)
    details = {"threshold": threshold, "validation_records": len(validation), "validation_nll": value,
               "validation_nll_always_expert": sum(expert_nll) / max(len(validation), 1),
               "validation_nll_always_generalist": sum(generalist_nll) / max(len(validation), 1)}
    write_json(folder / "router.json", {**info, "threshold": threshold, "calibration": details})
    return details


# ------------------------------------------------------------------ serving: what a routed server answers with

GENERALIST_MODEL = "generalist"


@dataclass
class ServedAdapter:
    """One adapter behind a routed server: its public model id, the router output it answers, its peft folder."""
    name: str
    expert: int
    folder: Path


def served_adapters(run: RunDirectory, strategy: str = "routed") -> list[ServedAdapter]:
    """Every expert that is served (kept, or blended with the generalist), then the generalist that answers every other router output.

    The generalist's folder is the adapter `StrategyModel` falls back to (`serving_names` and the
    serving tests check the two agree), so `serve`, `route` and `backend-command` need no model.
    """
    folder = get(strategy).folder(run)
    if not (folder / "partition.json").exists():
        raise FileNotFoundError(f"{folder} has no experts: run `gradientspace train-experts {run.root}` first")
    experts = [ServedAdapter(f"expert-{group}", i, path) for i, (group, (path, _)) in enumerate(served_groups(run, strategy).items())
               if path is not None and (path / "adapter_model.safetensors").exists()]
    return experts + [ServedAdapter(GENERALIST_MODEL, ROUTER_UNSURE, generalist_folder(run))]


def serving_names(model: StrategyModel, strategy: str = "routed") -> dict[str, str]:
    """Public model id → the adapter `model` loaded for it, for every served adapter."""
    owner = get(strategy).owner
    return {served.name: model.adapter_for(owner, served.expert) for served in served_adapters(model.run, owner)}
