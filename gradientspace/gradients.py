"""The gradient engine: exact per-sample gradients of every LoRA parameter, one backward per batch.

For a Linear layer y = x Wᵀ the gradient of a loss ℓ with respect to W is Σ_t (∂ℓ/∂y_t)ᵀ x_t, a
sum over the token positions t of one sample. Forward hooks on peft's `lora_A` and `lora_B`
Linear modules keep each one's input x and output y; one `torch.autograd.grad` of the batch loss
with respect to all those outputs gives ∂ℓ/∂y for every sample at once, and an einsum per module
turns them into per-sample weight gradients. The batch loss is the *sum* of per-sample mean
losses, so sample i's outputs receive exactly ∂ℓ_i/∂y_i: samples never mix. Pad positions carry
no loss and no attention, and their inputs are zeroed as well, so padding cannot leak in.

The flattened layout of a gradient vector is `GradientLayout`: LoRA modules in name order,
`lora_A.weight` then `lora_B.weight` of each, row-major.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .data import IGNORE, Example, collate

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class GradientLayout:
    names: list[str]          # parameter names, as in model.named_parameters()
    shapes: list[tuple[int, ...]]

    @property
    def dim(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    def to_json(self) -> dict:
        return {"dim": self.dim, "parameters": [{"name": n, "shape": list(s)} for n, s in zip(self.names, self.shapes)]}


def lora_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The active adapter's lora_A / lora_B Linear modules, paired with their weight's parameter name, in name order."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B") and isinstance(module, torch.nn.Linear):
            if parts[-1] in getattr(model, "active_adapters", [parts[-1]]):
                found.append((f"{name}.weight", module))
    if not found:
        raise ValueError("the model has no LoRA lora_A/lora_B Linear modules: wrap it with peft first")
    return sorted(found, key=lambda item: item[0])


def layout_of(model: torch.nn.Module) -> GradientLayout:
    modules = lora_linears(model)
    return GradientLayout([n for n, _ in modules], [tuple(m.weight.shape) for _, m in modules])


def per_sample_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each sample's labelled tokens: shape (batch,)."""
    shifted_labels = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), shifted_labels, ignore_index=IGNORE, reduction="none")
    counts = (shifted_labels != IGNORE).sum(dim=1)
    return losses.sum(dim=1) / counts.clamp(min=1)


class PerSampleGradients:
    """Hooks a peft model and returns one flattened LoRA gradient per sample of a batch."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = lora_linears(model)
        self.layout = GradientLayout([n for n, _ in self.modules], [tuple(m.weight.shape) for _, m in self.modules])
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "PerSampleGradients":
        # Adapters loaded for inference are frozen; their outputs must still carry a graph.
        self._frozen = [m.weight for _, m in self.modules if not m.weight.requires_grad]
        for weight in self._frozen:
            weight.requires_grad_(True)
        for position, (_, module) in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._keep(position)))
        return self

    def __exit__(self, *exc) -> None:
        for weight in self._frozen:
            weight.requires_grad_(False)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self._outputs.clear()

    def _keep(self, position: int):
        def hook(module, inputs, output):
            self._inputs[position] = inputs[0].detach()
            self._outputs[position] = output
        return hook

    def batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample gradients [batch, dim], per-sample losses [batch]) for one padded batch."""
        if not self._handles:
            raise RuntimeError("use PerSampleGradients as a context manager: `with PerSampleGradients(model) as engine:`")
        was_training = self.model.training
        self.model.eval()  # no dropout: gradients must be exact and repeatable
        try:
            with torch.enable_grad():
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
                losses = per_sample_mean_loss(logits, labels)
                outputs = [self._outputs[p] for p in range(len(self.modules))]
                output_grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        finally:
            self.model.train(was_training)
        keep = attention_mask.unsqueeze(-1).to(logits.dtype)
        pieces = []
        for position, grad in enumerate(output_grads):
            x = self._inputs[position] * keep
            if grad is None:  # module not on the loss path (cannot happen for q/k/v/o, kept for safety)
                grad = torch.zeros_like(self._outputs[position])
            pieces.append(torch.einsum("bto,bti->boi", grad, x).reshape(len(input_ids), -1))
        self._inputs.clear()
        self._outputs.clear()
        return torch.cat(pieces, dim=1), losses.detach()


@dataclass
class AdamState:
    """Warm-up optimizer moments, flattened in the gradient layout."""
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int

    def precondition(self, grads: torch.Tensor) -> torch.Tensor:
        """The Adam update each gradient would cause as the next step (LESS's gradient features)."""
        beta1, beta2 = ADAM_BETAS
        step = self.step + 1
        m = beta1 * self.exp_avg + (1 - beta1) * grads
        v = beta2 * self.exp_avg_sq + (1 - beta2) * grads.square()
        m_hat = m / (1 - beta1 ** step)
        v_hat = v / (1 - beta2 ** step)
        return m_hat / (v_hat.sqrt() + ADAM_EPS)


def transform(grads: torch.Tensor, adam: AdamState | None, normalize: bool) -> torch.Tensor:
    if adam is not None:
        grads = adam.precondition(grads)
    if normalize:
        # A sample with no loss tokens has a zero gradient; it stays zero rather than becoming NaN.
        grads = grads / grads.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return grads


def stream_gradients(model: torch.nn.Module, batches: list[list[Example]], pad_id: int, device: torch.device,
                     adam: AdamState | None = None, normalize: bool = True, start: int = 0, progress=None
                     ) -> Iterator[tuple[int, list[int], torch.Tensor, torch.Tensor]]:
    """Yield (batch number, sample indices, gradients [b, dim] in float32 on `device`, losses) per batch.

    Memory is one batch of gradients at a time, whatever the number of samples. `start` skips
    batches already consumed by an interrupted pass.
    """
    with PerSampleGradients(model) as engine:
        for number in range(start, len(batches)):
            batch = batches[number]
            input_ids, mask, labels = (t.to(device) for t in collate(batch, pad_id))
            grads, losses = engine.batch(input_ids, mask, labels)
            yield number, [e.index for e in batch], transform(grads, adam, normalize), losses
            if progress is not None:
                progress.update(len(batch))
