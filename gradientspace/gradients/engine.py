"""The gradient engine: exact per-sample gradients of every LoRA parameter, one backward per batch.

For a Linear layer y = x Wᵀ the gradient of a loss ℓ with respect to W is Σ_t (∂ℓ/∂y_t)ᵀ x_t, a
sum over the token positions t of one sample. A forward hook on each of peft's `lora_A` and
`lora_B` Linear modules registers a tensor hook on that module's output y; during the batch's one
backward pass the tensor hook receives ∂ℓ/∂y for every sample at once and writes the einsum
above into that module's columns of a [batch, d] float32 buffer allocated before the backward.
Each output gradient is therefore consumed and freed as backward passes its layer, never held
for all layers together. The batch loss is the *sum* of per-sample mean losses, so sample i's
outputs receive exactly ∂ℓ_i/∂y_i: samples never mix. Pad positions carry no loss and no
attention, and their inputs are zeroed as well, so padding cannot leak in.

Activation checkpointing (`checkpointing=True`) uses transformers' re-entrant layer
checkpointing: the first forward runs without a graph (the hooks see outputs that need no
gradient and do nothing), and backward re-runs each layer with a graph, where the hooks fire.
The base model may be bf16/fp16; einsums run in float32 and the buffer is float32.

The flattened layout of a gradient vector is `GradientLayout`: LoRA modules in name order,
`lora_A.weight` then `lora_B.weight` of each, row-major. It must cover every trainable parameter
(anything else trainable, e.g. `modules_to_save`, would be silently missing from the gradient).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradientspace.data.tokens import IGNORE, Example, collate

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class GradientLayout:
    names: list[str]  # parameter names, as in model.named_parameters()
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
    """Mean next-token cross-entropy over each sample's labelled tokens, from logits at every position: shape (batch,)."""
    return mean_loss_of_predictions(logits[:, :-1], labels[:, 1:])


def mean_loss_of_predictions(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each sample's predictions [batch, positions, vocabulary] against `targets` [batch, positions]
    (IGNORE where a position carries no loss): shape (batch,).

    The softmax runs over the labelled positions only: with a large vocabulary it is most of the
    cost of a step, and most positions of an instruction sample (the prompt, the padding) carry no
    loss. Their losses go back into a zero [batch, positions] grid, so each sample's sum adds the
    same numbers in the same order as a full-grid cross-entropy with `ignore_index` would."""
    labelled = targets != IGNORE
    token_losses = F.cross_entropy(logits[labelled].float(), targets[labelled], reduction="none")
    losses = torch.zeros(labelled.shape, dtype=token_losses.dtype, device=token_losses.device).masked_scatter(
        labelled, token_losses
    )
    return losses.sum(dim=1) / labelled.sum(dim=1).clamp(min=1)


def response_losses(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """`per_sample_mean_loss` of the model's forward, with the output layer run only where a loss is taken.

    The output layer is a [hidden × vocabulary] matmul at every position; on a small model with a
    large vocabulary it is most of the compute (tiny-random: 97 %; SmolLM2-135M: about a fifth),
    yet only the positions that predict a labelled token (the response) feed the loss. The model is
    asked for logits at the positions where any sample of the batch predicts one (transformers'
    `logits_to_keep`, so a family's own final scaling or soft-capping still applies); a model whose
    forward does not take it computes every position."""
    predicting = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(1)
    if not _keeps_some_logits(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return per_sample_mean_loss(logits, labels)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=predicting
    ).logits
    return mean_loss_of_predictions(logits, labels[:, predicting + 1])


def _keeps_some_logits(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(base))


@functools.cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    # read once per model class: `response_losses` runs on every training step and every scored batch
    import inspect

    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def check_layout_covers_trainable(model: torch.nn.Module, layout: GradientLayout) -> None:
    """Every parameter that trains must have columns in the gradient; anything else is a silent hole."""
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in set(layout.names))
    if missing:
        raise ValueError(
            f"trainable parameters outside the LoRA gradient layout: {', '.join(missing[:5])}"
            f"{' …' if len(missing) > 5 else ''} (only lora_A/lora_B Linear weights are supported)"
        )


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers' `GradientCheckpointingLayer`s): what activation checkpointing recomputes
    and what `gradients.shard_model: fsdp` shards one by one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class PerSampleGradients:
    """Hooks a peft model and returns one flattened LoRA gradient per sample of a batch.

    `checkpointing` recomputes each decoder layer in backward instead of keeping its activations.
    """

    def __init__(self, model: torch.nn.Module, checkpointing: bool = False):
        self.model = model
        self.modules = lora_linears(model)
        self.layout = GradientLayout([n for n, _ in self.modules], [tuple(m.weight.shape) for _, m in self.modules])
        self.checkpointing = checkpointing
        sizes = [int(torch.Size(s).numel()) for s in self.layout.shapes]
        self._offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self._buffer: torch.Tensor | None = None
        self._keep: torch.Tensor | None = None
        self._handles = []

    def __enter__(self) -> PerSampleGradients:
        # Adapters loaded for inference are frozen; their outputs must still carry a graph.
        self._frozen = [m.weight for _, m in self.modules if not m.weight.requires_grad]
        for weight in self._frozen:
            weight.requires_grad_(True)
        check_layout_covers_trainable(self.model, self.layout)
        for position, (_, module) in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._hook(position)))
        if self.checkpointing:
            self._checkpointing("enable", {"use_reentrant": True})
        return self

    def __exit__(self, *exc) -> None:
        for weight in self._frozen:
            weight.requires_grad_(False)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.checkpointing:
            self._checkpointing("disable")
            self._base().disable_input_require_grads()
        self._buffer = self._keep = None

    def _checkpointing(self, switch: str, options: dict | None = None) -> None:
        """transformers 5.x renamed `gradient_checkpointing_enable` / `_disable` to `activation_checkpointing_*` (5.17, on
        the GPU machine, has only the old names; 5.25 both): whichever this transformers has."""
        base = self._base()
        name = "activation" if hasattr(base, "activation_checkpointing_enable") else "gradient"
        kwargs = {} if options is None else {f"{name}_checkpointing_kwargs": options}
        getattr(base, f"{name}_checkpointing_{switch}")(**kwargs)

    def _base(self):
        """The transformers model under peft's wrapper: it owns the checkpointing switches."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _hook(self, position: int):
        start, stop = self._offsets[position], self._offsets[position + 1]

        def forward_hook(module, inputs, output):
            # No graph: the first forward of a checkpointed layer; its re-run in backward comes back here.
            if self._buffer is None or not output.requires_grad:
                return
            held = [inputs[0].detach()]  # the tensor autograd saves for the weight gradient anyway

            def write(grad: torch.Tensor) -> None:
                x = held.pop().float() * self._keep  # popped: the input is freed with this layer's backward
                self._buffer[:, start:stop] = torch.einsum("bto,bti->boi", grad.float(), x).reshape(len(x), -1)

            output.register_hook(write)

        return forward_hook

    def batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample gradients [batch, dim] float32, per-sample losses [batch]) for one padded batch."""
        if not self._handles:
            raise RuntimeError(
                "use PerSampleGradients as a context manager: `with PerSampleGradients(model) as engine:`"
            )
        was_training = self.model.training
        self.model.eval()  # no dropout: gradients must be exact and repeatable
        for layer in decoder_layers(self.model) if self.checkpointing else []:
            layer.training = True  # transformers checkpoints only layers in training mode; their dropouts stay off
        # Zeros: a module off the loss path (none for attention/MLP projections) keeps a zero gradient.
        self._buffer = torch.zeros(len(input_ids), self.layout.dim, dtype=torch.float32, device=input_ids.device)
        self._keep = attention_mask.unsqueeze(-1).float()
        # backward() also sums the batch gradient into .grad; keep whatever .grad held before out of it.
        weights = [m.weight for _, m in self.modules]
        previous = [w.grad for w in weights]
        for weight in weights:
            weight.grad = None
        try:
            with torch.enable_grad():
                losses = response_losses(self.model, input_ids, attention_mask, labels)
                # backward() rather than autograd.grad: re-entrant checkpointing supports only backward().
                losses.sum().backward()
            grads = self._buffer
        finally:
            for weight, grad in zip(weights, previous):
                weight.grad = grad
            self._buffer = self._keep = None
            self.model.train(was_training)
        return grads, losses.detach()


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
        m_hat = m / (1 - beta1**step)
        v_hat = v / (1 - beta2**step)
        return m_hat / (v_hat.sqrt() + ADAM_EPS)


def transform(grads: torch.Tensor, adam: AdamState | None, normalize: bool) -> torch.Tensor:
    if adam is not None:
        grads = adam.precondition(grads)
    if normalize:
        # A sample with no loss tokens has a zero gradient; it stays zero rather than becoming NaN.
        grads = grads / grads.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return grads


def stream_gradients(
    model: torch.nn.Module,
    batches: Sequence[Sequence[Example] | None],
    pad_id: int,
    device: torch.device,
    adam: AdamState | None = None,
    normalize: bool = True,
    start: int = 0,
    progress=None,
    checkpointing: bool = False,
    filler: Sequence[Example] = (),
) -> Iterator[tuple[int, list[int], torch.Tensor, torch.Tensor]]:
    """Yield (batch number, sample indices, gradients [b, dim] in float32 on `device`, losses) per batch.

    Memory is one batch of gradients at a time, whatever the number of samples. `start` skips
    batches already consumed by an interrupted pass. A batch given as None is a filler round:
    `filler` goes forward and backward and nothing is yielded, for a model sharded over the ranks,
    whose every forward and backward holds collectives: each rank must run as many as the others.
    """
    with PerSampleGradients(model, checkpointing) as engine:
        for number in range(start, len(batches)):
            batch = batches[number]
            if batch is None:
                engine.batch(*(t.to(device) for t in collate(filler, pad_id)))
                continue
            input_ids, mask, labels = (t.to(device) for t in collate(batch, pad_id))
            grads, losses = engine.batch(input_ids, mask, labels)
            yield number, [e.index for e in batch], transform(grads, adam, normalize), losses
            if progress is not None:
                progress.update(len(batch))
