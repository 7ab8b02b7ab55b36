"""LoRA training on transformers' `Trainer`: the warm-up adapter, the generalist and the experts.

What the project adds to a stock `Trainer` is small and stated here:
- the loss is the project's: each sample's mean response-token loss, then the mean over the batch
  (`response_losses`), so a long answer does not outweigh a short one — the same loss the
  gradient engine differentiates;
- evaluation on a validation split every epoch, early stopping on validation NLL with patience,
  and the best epoch's adapter kept (`load_best_model_at_end`); with `patience=None` training runs
  a fixed number of epochs (the equal-budget mode used for budget curves);
- checkpoints live in a folder named by the caller's key, so a changed input (learning rate,
  membership of a cluster…) can never resume stale state;
- the final adapter is saved as a plain peft folder, with the optimizer's Adam moments (LESS-style
  preconditioning reads them) and `trainer_log.json` (losses, validation curve, steps, tokens, seconds).
Schedules, mixed precision and gradient clipping are Trainer's. Under torchrun an adapter is either
one rank's own (the experts, dealt over the ranks) or trained by every rank together with DDP
(`TrainPlan.data_parallel`: the warm-up, the generalist and the other adapters on every record), each global batch of the one-process
order split over the ranks (`_RankShare`), so the steps, schedule and adapter are one process's.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainingArguments

from gradientspace import distributed
from gradientspace.data.tokens import Example, collate
from gradientspace.gradients.engine import ADAM_BETAS, ADAM_EPS, AdamState, GradientLayout, response_losses
from gradientspace.runs import atomic_path, write_json


@dataclass
class TrainPlan:
    max_epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    schedule: str = "cosine"  # transformers' lr_scheduler_type: cosine | linear | constant_with_warmup …
    warmup_ratio: float = 0.1  # share of all steps spent ramping the learning rate up
    patience: int | None = 1  # epochs without validation improvement before stopping; None = fixed epochs
    snapshot_epochs: tuple[int, ...] = ()  # keep the adapter as it was after these epochs, in `epoch-<e>/`
    sampling: str = (
        "group_by_length"  # Trainer's train_sampling_strategy; `sequential` keeps the given order (benchmarks)
    )
    report_to: tuple[str, ...] = ()  # Trainer's trackers (`train.report_to`): tensorboard, wandb, mlflow…
    activation_checkpointing: bool = False  # `train.activation_checkpointing`: recompute activations in backward
    logs: Path | None = None  # where TensorBoard writes this adapter's curves (`RUN/logs/<adapter>/`)
    # every rank of the torchrun job trains this adapter together (DDP), each global batch split over the ranks: the
    # warm-up and the generalist, which every other adapter waits for, and the other adapters on every record
    data_parallel: bool = False


class _RankShare(torch.utils.data.Sampler):
    """This rank's share of each global batch of a data-parallel training, drawn from the sampler one process would use
    (every rank draws the same order, and the same as one process: the random state is the same in each).

    Each global batch (the config's batch size) is cut into contiguous shares, one per rank; a rank left without a
    sample (the last batch smaller than the ranks) gets one sample weighted 0, so every rank runs the step's collectives.
    An item is (index, weight, samples in the global batch): the loss of a share is scaled so that DDP's mean over the
    ranks is the global batch's mean loss, as one process computes it."""

    def __init__(self, order: torch.utils.data.Sampler, batch_size: int, rank: int, world: int):
        self.order, self.batch_size, self.rank, self.world = order, batch_size, rank, world

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self):
        indices = list(self.order)
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start : start + self.batch_size]
            size = -(-len(batch) // self.world)
            share = batch[self.rank * size : (self.rank + 1) * size]
            yield [(i, 1.0, len(batch)) for i in share] or [(batch[0], 0.0, len(batch))]


class _ExampleDataset(torch.utils.data.Dataset):
    """Examples as the dicts Trainer's length-grouped sampler reads (`input_ids` gives the length); an item of a rank's
    share (`_RankShare`) carries its weight and its global batch's size too."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item) -> dict:
        index, *share = item if isinstance(item, tuple) else (item,)
        example = self.examples[index]
        weighted = dict(zip(("weight", "global_batch"), share))
        return {"input_ids": example.input_ids, "labels": example.labels, **weighted}


def _collator(pad_id: int):
    def collate_dicts(rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = [Example(i, row["input_ids"], row["labels"], False) for i, row in enumerate(rows)]
        input_ids, mask, labels = collate(batch, pad_id)
        shares = {key: torch.tensor([row[key] for row in rows]) for key in ("weight", "global_batch") if key in rows[0]}
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, **shares}

    return collate_dicts


def _trainer_class():
    from transformers import Trainer

    class ResponseLossTrainer(Trainer):
        """Trainer with the project's loss: mean response-token loss per sample, mean over the batch."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # our loss is already a per-batch mean

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            losses = response_losses(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            if "weight" in inputs:  # a rank's share of a global batch (`_RankShare`); DDP then averages over the ranks
                world = self.args.world_size
                loss = (losses * inputs["weight"].to(losses)).sum() * world / inputs["global_batch"][0].to(losses)
            else:
                loss = losses.mean()
            return (loss, {}) if return_outputs else loss  # no logits: validation reads only the loss

        def get_train_dataloader(self):
            if self.args.world_size == 1:
                return super().get_train_dataloader()
            # Trainer would deal whole batches to the ranks (another order, batches × ranks per step): each rank takes its
            # share of every global batch of the one-process order instead, not resharded by accelerate
            share = _RankShare(
                self._get_train_sampler(),
                self.args.per_device_train_batch_size,
                self.args.process_index,
                self.args.world_size,
            )
            return torch.utils.data.DataLoader(
                self.train_dataset, batch_sampler=share, collate_fn=self.data_collator, num_workers=0
            )

        def get_eval_dataloader(self, eval_dataset=None):
            if self.args.world_size == 1:
                return super().get_eval_dataloader(eval_dataset)
            # every rank scores the whole (small) validation split in one process's batches: the validation loss that
            # picks the best epoch and stops training is then one process's, not a sum in another order over shards
            return torch.utils.data.DataLoader(
                eval_dataset or self.eval_dataset,
                batch_size=self.args.per_device_eval_batch_size,
                collate_fn=self.data_collator,
                num_workers=0,
            )

    return ResponseLossTrainer


def _callbacks(plan: TrainPlan, out_dir: Path, has_validation: bool, seconds_file: Path, seconds_before: float) -> list:
    from transformers import EarlyStoppingCallback, TrainerCallback

    class SecondsAtCheckpoint(TrainerCallback):
        """Write the training seconds so far beside each checkpoint: Trainer's `train_runtime` restarts on
        resume, and a resumed adapter's compute must count the interrupted run's seconds too."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                write_json(seconds_file, {"seconds": seconds_before + time.monotonic() - self.start})

    class Snapshots(TrainerCallback):
        """Save the adapter after the epochs named in `plan.snapshot_epochs` (budget curves)."""

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            epoch = round(state.epoch or 0)
            if epoch in plan.snapshot_epochs and state.is_world_process_zero:
                _save_adapter(model, out_dir / f"epoch-{epoch}")

    callbacks = [SecondsAtCheckpoint()] + ([Snapshots()] if plan.snapshot_epochs else [])
    if "tensorboard" in plan.report_to and (distributed.is_main() or not plan.data_parallel):  # one writer per adapter
        # Trainer would write under its checkpoint folder, which is removed once the adapter is saved: the run's logs/ keeps them
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(plan.logs or out_dir / "logs"))))
    if has_validation and plan.patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=plan.patience))
    return callbacks


def _quiet_progress(trainer) -> None:
    """Keep Trainer's progress bar but show the loss in it instead of printing a dict per log step."""
    from transformers.trainer_callback import ProgressCallback

    class LossInBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossInBar())


class OnOneDevice(TrainingArguments):
    """transformers' TrainingArguments bound to one device (`device=`), one GPU: a one-process job would put the model on
    cuda:0 and split each batch over every GPU the process sees (DataParallel: a batch of 8 on 8 GPUs becomes 64, with 8×
    fewer steps). Bound, every rank trains on its own GPU with the batch the config says, whatever the GPUs it sees.
    A module-level class: Trainer pickles its arguments into every checkpoint."""

    def __init__(self, *args, device: torch.device | None = None, **kwargs):
        self.bound_device = device  # before the dataclass's __post_init__, which may already ask for the device
        super().__init__(*args, **kwargs)

    @cached_property
    def _setup_devices(self) -> torch.device:
        device = getattr(self, "bound_device", None)
        if device is None or device.type != "cuda":
            return TrainingArguments._setup_devices.func(self)
        # transformers would make cuda:0 current in every rank, and since CUDA 12 that creates a context (hundreds of MB)
        # on GPU 0 for each of them: its choice is replaced, so it is not made current either
        with mock.patch.object(torch.cuda, "set_device", lambda _: None):
            TrainingArguments._setup_devices.func(self)
        self._n_gpu = 1
        torch.cuda.set_device(device)
        return device


def _checkpointing(enabled: bool) -> dict:
    """Trainer's activation checkpointing where asked, under the name this transformers knows (5.x renamed
    `gradient_checkpointing`); non-reentrant, since the frozen base's inputs need no gradient, which the reentrant
    variant would require of them."""
    if not enabled:
        return {}
    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


@contextlib.contextmanager
def _processes(data_parallel: bool) -> Iterator[None]:
    """Let Trainer see the torchrun job (a data-parallel adapter, DDP over every rank) or a one-process job even under
    torchrun (an expert is one rank's own: a DDP wrap would wait at its first collective for ranks that never join).

    accelerate decides from these variables and keeps what it decided in a state shared by the whole process, so that
    state is reset before each training: one process trains adapters of both kinds.
    """
    from accelerate.state import AcceleratorState

    names = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    with mock.patch.dict(os.environ):  # the environment as it was, on the way out
        if data_parallel:
            # DDP on the model's own device (`OnOneDevice`'s), not accelerate's cuda:LOCAL_RANK, which a process that
            # sees fewer GPUs than its local rank does not have
            os.environ["ACCELERATE_BYPASS_DEVICE_MAP"] = "true"
        else:
            for name in names:
                os.environ.pop(name, None)
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            yield
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)


def train_adapter(
    model,
    train: list[Example],
    validation: list[Example],
    pad_id: int,
    device: torch.device,
    plan: TrainPlan,
    out_dir: Path,
    key: str,
    desc: str,
) -> dict:
    """Train the model's active LoRA adapter; `out_dir` becomes a plain peft folder.

    Checkpoints go to `<out_dir>.trainer-<key>/` and are resumed from only when the key matches;
    they are removed once the adapter is saved. With a validation split, the adapter saved is the
    best epoch's; its validation NLL before training (`initial_eval_loss`) is recorded too, so a
    caller can tell whether training helped at all.
    """
    with _processes(plan.data_parallel):
        return _train(model, train, validation, pad_id, device, plan, Path(out_dir), key, desc)


def _train(model, train, validation, pad_id, device, plan: TrainPlan, out_dir: Path, key: str, desc: str) -> dict:
    from transformers.trainer_utils import get_last_checkpoint

    work_dir = out_dir.with_name(f"{out_dir.name}.trainer-{key}")
    has_validation = bool(validation)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    args = OnOneDevice(
        device=device,
        output_dir=str(work_dir),
        num_train_epochs=plan.max_epochs,
        learning_rate=plan.learning_rate,
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=plan.batch_size * 2,
        lr_scheduler_type=plan.schedule,
        warmup_steps=plan.warmup_ratio,
        weight_decay=0.0,
        adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1],
        adam_epsilon=ADAM_EPS,
        eval_strategy="epoch" if has_validation else "no",
        prediction_loss_only=True,
        save_strategy="epoch",
        load_best_model_at_end=has_validation and plan.patience is not None,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        save_total_limit=2,
        logging_steps=1,
        seed=plan.seed,
        data_seed=plan.seed,
        report_to=[tracker for tracker in plan.report_to if tracker != "tensorboard"],
        run_name=desc,
        **_checkpointing(plan.activation_checkpointing),
        bf16=bf16,
        use_cpu=device.type == "cpu",
        remove_unused_columns=False,
        train_sampling_strategy=plan.sampling,
        dataloader_num_workers=0,
        disable_tqdm=False,
        label_names=["labels"],
    )
    resume = get_last_checkpoint(str(work_dir)) if work_dir.exists() else None
    if plan.data_parallel:  # what every rank resumes from, and so which collectives it joins, is rank 0's reading
        resume = distributed.from_main(resume)
    seconds_file = work_dir / "train_seconds.json"
    seconds_before = json.loads(seconds_file.read_text())["seconds"] if resume and seconds_file.exists() else 0.0
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=_ExampleDataset(train),
        eval_dataset=_ExampleDataset(validation) if has_validation else None,
        data_collator=_collator(pad_id),
        callbacks=_callbacks(plan, out_dir, has_validation, seconds_file, seconds_before),
    )
    _quiet_progress(trainer)
    initial = None
    if has_validation:
        initial_file = work_dir / "initial_eval.json"
        stored = initial_file.exists()
        if plan.data_parallel:
            stored = distributed.from_main(stored)
        if resume and stored:
            initial = json.loads(initial_file.read_text())["eval_loss"]
        else:
            initial = trainer.evaluate()["eval_loss"]
            if trainer.is_world_process_zero():
                write_json(initial_file, {"eval_loss": initial})
    print(
        f"{desc}: {'resuming from ' + Path(resume).name if resume else 'training'} "
        f"({len(train)} samples, {len(validation)} validation)",
        flush=True,
    )
    # accelerate prepares a model once: the evaluation above prepared it unwrapped, and training would then skip DDP
    vars(model).pop("_is_accelerate_prepared", None)
    # Trainer reloads the best epoch's adapter through peft, which would read it onto GPU 0 (`bank.AdapterBank`): bound
    with mock.patch.object(model, "load_adapter", functools.partial(model.load_adapter, torch_device=str(device))):
        output = trainer.train(resume_from_checkpoint=resume)
    model.eval()
    history = trainer.state.log_history
    validation_curve = [{"epoch": round(h["epoch"]), "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h]
    best = min(validation_curve, key=lambda row: row["eval_loss"]) if validation_curve else None
    epochs_run = round(trainer.state.epoch or 0)
    tokens_per_epoch = sum(sum(1 for label in e.labels if label != -100) for e in train)
    summary = {
        "steps": trainer.state.global_step,
        "epochs_run": epochs_run,
        "max_epochs": plan.max_epochs,
        "samples": len(train),
        "validation_samples": len(validation),
        "tokens": tokens_per_epoch * epochs_run,
        "train_seconds": round(seconds_before + output.metrics.get("train_runtime", 0.0), 2),
        "initial_eval_loss": initial,
        "best_epoch": best["epoch"] if best and plan.patience is not None else epochs_run,
        "best_eval_loss": best["eval_loss"]
        if best and plan.patience is not None
        else (validation_curve[-1]["eval_loss"] if validation_curve else None),
    }
    if trainer.is_world_process_zero():
        _save_adapter(model, out_dir)
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        _save_moments(
            optimizer,
            [(n, p) for n, p in model.named_parameters() if p.requires_grad],
            out_dir / "optimizer.safetensors",
        )
        write_json(
            out_dir / "trainer_log.json",
            {
                **summary,
                "validation_curve": validation_curve,
                "loss": [round(h["loss"], 5) for h in history if "loss" in h],
            },
        )
        shutil.rmtree(work_dir, ignore_errors=True)
    if plan.data_parallel:
        # no rank reads the adapter before rank 0 has written it; the DDP wrapper is dropped now rather than whenever
        # the collector finds it (it holds the adapter's weights and their gradient buckets)
        del trainer
        gc.collect()
        distributed.barrier()
    return summary


def _save_adapter(model, folder: Path) -> None:
    """Write the adapter files into `folder` atomically, file by file."""
    tmp = folder.with_name(folder.name + ".adapter-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    folder.mkdir(parents=True, exist_ok=True)
    for file in tmp.iterdir():
        file.replace(folder / file.name)
    tmp.rmdir()


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
