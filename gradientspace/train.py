"""A thin LoRA training loop shared by the warm-up adapter and the experts.

It checkpoints (adapter, optimizer, step, losses) every `checkpoint_every` steps and resumes from
the last checkpoint, and saves the final adapter as a plain peft folder, plus the optimizer's Adam
moments (used to precondition gradients as LESS does) and the loss curve.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import Example, collate, shuffled_length_batches
from .gradients import ADAM_BETAS, ADAM_EPS, AdamState, GradientLayout, per_sample_mean_loss
from .runs import atomic_path, write_json


@dataclass
class TrainPlan:
    epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    max_steps: int | None = None  # cut the schedule short (equal-budget comparisons)
    checkpoint_every: int = 50
    snapshot_epochs: tuple[int, ...] = ()  # keep the adapter as it was after these epochs, in `epoch-<e>/`


def _batches_for(examples: list[Example], plan: TrainPlan) -> tuple[list[list[Example]], dict[int, int]]:
    """The whole schedule of batches, and {step after which an epoch ends: epoch number}."""
    batches, epoch_ends = [], {}
    for epoch in range(plan.epochs):
        epoch_batches = shuffled_length_batches(examples, plan.batch_size, chunk_size=max(plan.batch_size * 16, 64), seed=plan.seed * 1000 + epoch)
        random.Random(plan.seed * 1000 + epoch).shuffle(epoch_batches)  # length-sorted chunks, mixed order
        batches.extend(epoch_batches)
        epoch_ends[len(batches)] = epoch + 1
    if plan.max_steps is not None:
        batches = batches[: plan.max_steps]
    return batches, epoch_ends


def _save_adapter(model, folder: Path) -> None:
    """Write the adapter files into `folder` atomically, file by file, and drop the checkpoint."""
    tmp = folder.with_name(folder.name + ".adapter-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    folder.mkdir(parents=True, exist_ok=True)
    for file in tmp.iterdir():
        file.replace(folder / file.name)
    tmp.rmdir()
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def train_adapter(model, examples: list[Example], pad_id: int, device: torch.device, plan: TrainPlan, out_dir: Path, desc: str) -> dict:
    """Train the model's active LoRA adapter.

    `out_dir` becomes a peft adapter folder (`PeftModel.from_pretrained(base, out_dir)` and vLLM's
    `--lora-modules` load it as it is) that also holds `optimizer.safetensors` and `losses.json`.
    """
    from peft import set_peft_model_state_dict

    out_dir = Path(out_dir)
    checkpoint = out_dir / "checkpoint"
    batches, epoch_ends = _batches_for(examples, plan)
    named = _trainable(model)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=plan.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
    losses: list[float] = []
    start = 0
    if (checkpoint / "state.json").exists():
        state = json.loads((checkpoint / "state.json").read_text())
        set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
        start, losses = state["step"], state["losses"]
    model.train()
    torch.manual_seed(plan.seed)
    progress = tqdm(total=len(batches), initial=start, desc=desc, unit="step", dynamic_ncols=True)
    for step in range(start, len(batches)):
        input_ids, mask, labels = (t.to(device) for t in collate(batches[step], pad_id))
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        loss = per_sample_mean_loss(logits, labels).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 5))
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if epoch_ends.get(step + 1) in plan.snapshot_epochs and step + 1 < len(batches):
            _save_adapter(model, out_dir / f"epoch-{epoch_ends[step + 1]}")
        if (step + 1) % plan.checkpoint_every == 0 and step + 1 < len(batches):
            _save_checkpoint(model, optimizer, step + 1, losses, checkpoint)
    progress.close()
    model.eval()
    _save_adapter(model, out_dir)
    if plan.epochs in plan.snapshot_epochs:  # the final adapter is the last snapshot: a copy keeps curves uniform
        _save_adapter(model, out_dir / f"epoch-{plan.epochs}")
    _save_moments(optimizer, named, out_dir / "optimizer.safetensors")
    write_json(out_dir / "losses.json", {"loss": losses, "steps": len(batches), "examples": len(examples),
                                         "tokens": sum(sum(1 for l in e.labels if l != -100) for b in batches for e in b)})
    return {"steps": len(batches), "final_loss": losses[-1] if losses else None}


def _save_checkpoint(model, optimizer, step: int, losses: list[float], folder: Path) -> None:
    from peft import get_peft_model_state_dict

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}, str(tmp / "adapter_model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _save_moments(optimizer, named, path: Path) -> None:
    tensors, step = {}, 0
    for name, parameter in named:
        state = optimizer.state.get(parameter, {})
        if "exp_avg" in state:
            tensors[f"exp_avg.{name}"] = state["exp_avg"].detach().cpu().contiguous()
            tensors[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].detach().cpu().contiguous()
            step = int(state["step"])
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(step)})


def load_adam_state(path: Path, layout: GradientLayout, device: torch.device) -> AdamState:
    """The warm-up's Adam moments flattened in the gradient layout (parameter names must match)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        step = int(handle.metadata()["step"])
    tensors = load_file(str(path))
    missing = [n for n in layout.names if f"exp_avg_sq.{n}" not in tensors]
    if missing:
        raise ValueError(f"{path} has no Adam moments for {missing[0]}; re-run the warm-up")
    flat = lambda kind: torch.cat([tensors[f"{kind}.{n}"].reshape(-1) for n in layout.names]).to(device)
    return AdamState(flat("exp_avg"), flat("exp_avg_sq"), step)
