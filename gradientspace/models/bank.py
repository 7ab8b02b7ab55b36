"""The adapter bank: one base model with named LoRA adapters loaded on it, their NLL, and the one decoding path.

`evaluate`, `generate` and `serve` all score and decode through this class, so a prompt gets the
same tokens whichever command asks. It knows adapters by name only: which adapter serves a prompt
is the strategies' business (`routing.model.StrategyModel` holds a bank and the strategies).

Decoding is transformers' `generate`, left-padded, greedy unless a logits processor samples, ending
a row at any of the model's end-of-turn ids (`loading.end_of_turn_ids`). Rows bound for different
adapters decode in one call through `StackedLoRA`: for row b with adapter a(b), a LoRA layer
computes y_b = W x_b + s_a B_a A_a x_b; stacking every adapter's A (by rows) and s·B (by columns)
gives, for the whole batch at once, y = W x + B_cat (m ⊙ (A_cat x)), where the mask m keeps row b's
own block of rank columns and zeroes the rest: two small matmuls per layer whatever the number of
adapters, exactly each row's own adapter. peft's mixed-adapter batches (`adapter_names=[...]`)
compute the same with a Python loop of gather, two matmuls and scatter per adapter per layer, which
on a small model costs more than the layer itself (`bench/serve.py` times both).

The one exception is a mixture of adapters within one prompt (the ELREA ensemble, which is compared,
never served): its next-token logits are a weighted sum over adapters, each with its own KV cache,
so `decode_mixture` runs K + 1 forward passes per token.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import time
from pathlib import Path

import torch
from transformers import StoppingCriteria

from gradientspace.config import ModelConfig
from gradientspace.gradients.engine import per_sample_mean_loss, response_losses
from gradientspace.models.loading import end_of_turn_ids, load_base_for, load_tokenizer, pick_device


def _files_of(folder: Path) -> tuple:
    """What an adapter folder holds, as far as reloading goes: its weights file's identity, size and time."""
    weights = (Path(folder) / "adapter_model.safetensors").resolve()
    status = weights.stat()
    return (str(weights), status.st_ino, status.st_size, status.st_mtime_ns)


class AdapterBank:
    """The base model, loaded once, with named adapters (the first one given at construction; `load` adds more).

    One bank serves a whole process: every stage that scores or decodes asks the run for it
    (`runner.Run.bank`), so the base is loaded once, in the dtype `model.dtype` asks for. `load` keeps
    an adapter already loaded from the same files and replaces one whose files changed (an adapter
    retrained in the same process) or that came from another folder under the same name.
    """

    def __init__(self, model: ModelConfig, first_name: str, first_folder: Path, base=None):
        """`base`: the base model `model.*` names, already loaded (the run's, `runner.Run`); loaded here if None."""
        from peft import PeftModel

        self.device = pick_device(model.device)
        self.tokenizer = load_tokenizer(model.name)
        base = base if base is not None else load_base_for(model)
        self.eos_ids = end_of_turn_ids(self.tokenizer, base.generation_config)
        # transformers 5 renamed `past_key_values` to `cache` (the old name goes in 5.40); 4.x knows only the old one
        self.cache_name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        # peft loads an adapter's file onto its own guess, `cuda`, which safetensors reads as GPU 0 whatever the rank's
        # device: every rank would open a context on GPU 0 and stage its adapters there
        self.model = PeftModel.from_pretrained(
            base, str(first_folder), adapter_name=first_name, torch_device=str(self.device)
        ).eval()
        self.sources = {first_name: _files_of(first_folder)}

    def __contains__(self, name: str) -> bool:
        return name in self.model.peft_config

    def load(self, name: str, folder: Path) -> None:
        """Adapter `name` from `folder`: kept where it was loaded from the same files, (re)loaded otherwise."""
        files = _files_of(folder)
        if self.sources.get(name) == files:
            return
        if name in self.model.peft_config and not self._same_shape(name, folder):  # a blend under an expert's name
            self.drop(name)
        # same shape: the new weights written over the old
        self.model.load_adapter(str(folder), adapter_name=name, torch_device=str(self.device))
        self.sources[name] = files
        self.model.eval()

    def drop(self, name: str) -> None:
        """Remove adapter `name` where it is loaded (another becomes active if it was): a candidate blend once decided."""
        if name not in self.model.peft_config:
            return
        others = [other for other in self.model.peft_config if other != name]
        if name in self.model.active_adapters and others:
            self.model.set_adapter(others[0])
        self.model.delete_adapter(name)
        self.sources.pop(name, None)

    def _same_shape(self, name: str, folder: Path) -> bool:
        """Whether the adapter in `folder` has the rank, scale and target modules of the one loaded as `name`."""
        saved = json.loads((Path(folder) / "adapter_config.json").read_text())
        loaded = self.model.peft_config[name]
        return (saved.get("r"), saved.get("lora_alpha"), sorted(saved.get("target_modules") or [])) == (
            loaded.r,
            loaded.lora_alpha,
            sorted(loaded.target_modules or []),
        )

    def stacked(self, adapters: list[str]) -> StackedLoRA:
        """The given adapters stacked for batches that mix them (`decode(..., stack=...)`)."""
        return StackedLoRA(self.model, adapters)

    # ---------------------------------------------------------------- scoring

    @torch.no_grad()
    def nll(self, adapter: str, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """Teacher-forced mean response-token NLL of each row of a padded batch under one adapter."""
        self.model.set_adapter(adapter)
        return response_losses(self.model, input_ids, mask, labels).tolist()

    @torch.no_grad()
    def mixture_nll(
        self, weights: dict[str, float], input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> list[float]:
        """The same under a mixture of adapters' next-token logits."""
        logits, _ = self.mixed_logits(weights, input_ids, mask)
        return per_sample_mean_loss(logits, labels).tolist()

    def mixed_logits(self, weights: dict[str, float], input_ids, mask, past=None):
        """Weighted sum of next-token logits over adapters (one adapter: its logits), and each adapter's cache."""
        logits, caches = None, {}
        for name, weight in weights.items():
            self.model.set_adapter(name)
            cache = {self.cache_name: (past or {}).get(name)}
            out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=past is not None, **cache)
            part = out.logits.float() * weight
            logits = part if logits is None else logits + part
            caches[name] = getattr(out, self.cache_name)
        return logits, caches

    # ---------------------------------------------------------------- decoding

    @torch.no_grad()
    def decode(
        self,
        prompts: list[list[int]],
        adapters: list[str],
        max_new_tokens: int,
        stopping_criteria=None,
        logits_processor=None,
        stack: StackedLoRA | None = None,
    ) -> list[list[int]]:
        """The new tokens of each prompt, row b decoded with adapter `adapters[b]`, up to its first end-of-turn id.

        One `generate` call: rows on one adapter through peft's own path, rows on several through `stack`
        (made by `stacked`, holding every adapter of the batch). `stopping_criteria` and `logits_processor`
        are transformers' lists, for a caller that streams, stops or samples per row (`serving.engine`)."""
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        if len(set(adapters)) > 1:
            if stack is None:
                raise ValueError("a batch that mixes adapters needs their stack (`AdapterBank.stacked`)")
            adapter_context = stack.batch(adapters)
        else:
            self.model.set_adapter(adapters[0])
            adapter_context = contextlib.nullcontext()
        with adapter_context:
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=sorted(self.eos_ids),
                pad_token_id=pad,
                stopping_criteria=stopping_criteria,
                logits_processor=logits_processor,
            )
        rows = []
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in self.eos_ids), len(row))
            rows.append(row[:end])
        return rows

    @torch.no_grad()
    def decode_mixture(
        self, weights: dict[str, float], prompt_ids: list[int], max_new_tokens: int
    ) -> tuple[list[int], float, float]:
        """Greedy decoding of one prompt under a mixture of adapters, a KV cache per adapter; returns (new tokens,
        first-token seconds, total seconds)."""
        start = time.perf_counter()
        step_input = torch.tensor([prompt_ids], device=self.device)
        mask = torch.ones_like(step_input)
        past: dict = {name: None for name in weights}
        new: list[int] = []
        first = 0.0
        for _ in range(max_new_tokens):
            logits, past = self.mixed_logits(weights, step_input, mask, past=past)
            token = int(logits[0, -1].argmax())
            if not new:
                first = time.perf_counter() - start
            if token in self.eos_ids:
                break
            new.append(token)
            step_input = torch.tensor([[token]], device=self.device)
            mask = torch.cat([mask, torch.ones_like(step_input)], dim=1)
        return new, first, time.perf_counter() - start


class StackedLoRA:
    """Every LoRA layer's adapters stacked, so a batch mixing adapters costs two matmuls per layer (module docstring)."""

    def __init__(self, peft_model, adapters: list[str]):
        from peft.tuners.lora import LoraLayer

        self.peft_model, self.adapters = peft_model, list(dict.fromkeys(adapters))
        self.layers = []  # (module, A_cat [R, in], scaled B_cat [out, R], each adapter's column span)
        with torch.no_grad():
            for module in peft_model.modules():
                # every LoRA layer over a Linear: peft's `lora.Linear`, and its `Linear4bit` over a 4-bit base
                if isinstance(module, LoraLayer) and all(
                    a in module.lora_A and isinstance(module.lora_A[a], torch.nn.Linear) for a in self.adapters
                ):
                    a_cat = torch.cat([module.lora_A[a].weight for a in self.adapters])
                    b_cat = torch.cat([module.lora_B[a].weight * module.scaling[a] for a in self.adapters], dim=1)
                    ends = torch.tensor([module.lora_A[a].weight.shape[0] for a in self.adapters]).cumsum(0).tolist()
                    self.layers.append((module, a_cat, b_cat, dict(zip(self.adapters, zip([0] + ends[:-1], ends)))))

    @contextlib.contextmanager
    def batch(self, row_adapters: list[str]):
        """Inside: the model applies row b's own adapter to row b (peft's LoRA switched off, the stacked update hooked on)."""
        masks: dict[tuple, torch.Tensor] = {}  # one mask per distinct rank layout (usually a single one)
        hooks = []
        for module, a_cat, b_cat, spans in self.layers:
            key = tuple(spans[a] for a in self.adapters)
            if key not in masks:
                mask = torch.zeros(len(row_adapters), 1, a_cat.shape[0], device=a_cat.device, dtype=a_cat.dtype)
                for row, adapter in enumerate(row_adapters):
                    start, end = spans[adapter]
                    mask[row, 0, start:end] = 1
                masks[key] = mask
            hooks.append(module.register_forward_hook(_stacked_update(a_cat, b_cat, masks[key])))
        try:
            with self.peft_model.disable_adapter():
                yield
        finally:
            for hook in hooks:
                hook.remove()


def _stacked_update(a_cat: torch.Tensor, b_cat: torch.Tensor, mask: torch.Tensor):
    def hook(module, args, output):
        # in the LoRA weights' float32 and back, as peft's own LoRA forward does over a bf16 or 4-bit base
        update = ((args[0].to(a_cat.dtype) @ a_cat.T) * mask) @ b_cat.T
        return output + update.to(output.dtype)

    return hook


class FirstToken(StoppingCriteria):
    """A stopping criterion that never stops: it notes when `generate` produced its first token."""

    def __init__(self):
        self.start, self.first = time.perf_counter(), None

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        if self.first is None:
            self.first = time.perf_counter()
        return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)

    def seconds(self) -> float:
        return (self.first or time.perf_counter()) - self.start
