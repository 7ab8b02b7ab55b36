"""The router: a MiniLM encoder and a linear head that send a prompt to one expert.

Trained on prompt text → group id of the training records (never on `source`), with a seeded,
stratified held-out split whose accuracy is reported. At inference one encoder forward picks
the expert; a top probability below `threshold` sends the prompt to the generalist (single)
adapter instead, reported as expert -1. The router never sees the validation split, so the
threshold can be chosen there honestly (`routing.threshold.calibrate_threshold`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gradientspace.experts.strategies import ROUTER_UNSURE, get, routed
from gradientspace.models.encoder import embed_texts, load_encoder, mean_pool, shared_embeddings
from gradientspace.runs import Placement, Stage, add_to_section, atomic_path, config_hash, write_json


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), the held-out share taken from every group that has ≥ 2 members."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for group in sorted(set(labels)):
        members = [i for i, l in enumerate(labels) if l == group]
        rng.shuffle(members)
        cut = int(round(fraction * len(members))) if len(members) > 1 else 0
        held.extend(members[:cut])
        train.extend(members[cut:])
    return sorted(train), sorted(held)


@dataclass
class Router:
    head: torch.nn.Linear
    threshold: float
    encoder: tuple | None = None  # (tokenizer, model) when fine-tuned, else the packaged MiniLM is used
    device: torch.device = torch.device("cpu")

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        if self.encoder is None:
            embeddings = shared_embeddings(texts, self.device)
        else:
            embeddings = embed_texts(texts, self.device, encoder=self.encoder)
        return torch.softmax(self.head(embeddings.to(self.device)), dim=1).cpu()

    def route(self, texts: list[str]) -> tuple[list[int], list[float], list[int]]:
        """(expert id, or ROUTER_UNSURE for the fall-back; top probability; the top group before the threshold) per prompt."""
        probabilities = self.probabilities(texts)
        top, choice = probabilities.max(dim=1)
        experts = [int(c) if float(p) >= self.threshold else ROUTER_UNSURE for p, c in zip(top, choice)]
        return experts, top.tolist(), choice.tolist()

    def save(self, folder: Path, details: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "head.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(tmp))
        if self.encoder is not None:
            tokenizer, model = self.encoder
            model.save_pretrained(folder / "encoder")
            tokenizer.save_pretrained(folder / "encoder")
        write_json(
            folder / "router.json",
            {
                "classes": self.head.out_features,
                "threshold": self.threshold,
                "finetuned_encoder": self.encoder is not None,
                **details,
            },
        )

    @classmethod
    def load(cls, folder: Path, device: torch.device, threshold: float | None = None) -> Router:
        info = json.loads((folder / "router.json").read_text())
        state = load_file(str(folder / "head.safetensors"))
        head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0]).to(device)
        head.load_state_dict(state)
        encoder = None
        if info["finetuned_encoder"]:
            from transformers import AutoModel, AutoTokenizer

            encoder = (
                AutoTokenizer.from_pretrained(folder / "encoder"),
                AutoModel.from_pretrained(folder / "encoder").to(device).eval(),
            )
        return cls(head, info["threshold"] if threshold is None else threshold, encoder, device)


def _accuracy(router: Router, texts: list[str], labels: list[int]) -> float | None:
    if not texts:
        return None
    predicted = router.probabilities(texts).argmax(dim=1)
    return float((predicted == torch.tensor(labels)).float().mean())


def train_router(
    texts: list[str],
    labels: list[int],
    classes: int,
    device: torch.device,
    *,
    epochs: int,
    learning_rate: float,
    validation_fraction: float,
    threshold: float,
    seed: int,
    finetune_encoder: bool = False,
) -> tuple[Router, dict]:
    """Fit the head (and optionally the encoder) with cross-entropy; returns (router, details with held-out accuracy)."""
    train_idx, held_idx = stratified_split(labels, validation_fraction, seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(384, classes).to(device)
    y = torch.tensor(labels, device=device)
    curve = []
    if not finetune_encoder:
        features = shared_embeddings(texts, device).to(device)  # the same prompts for each routed strategy's router
        optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=1e-2)
        for _ in range(epochs):  # full batch: a few hundred 384-d rows
            loss = torch.nn.functional.cross_entropy(head(features[train_idx]), y[train_idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(round(loss.item(), 5))
        router = Router(head, threshold, None, device)
    else:
        tokenizer, model = load_encoder(device)
        model.train()
        optimizer = torch.optim.AdamW(
            [{"params": model.parameters(), "lr": 2e-5}, {"params": head.parameters(), "lr": learning_rate}]
        )
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = [train_idx[i] for i in torch.randperm(len(train_idx), generator=generator).tolist()]
            for start in range(0, len(order), 16):
                batch = order[start : start + 16]
                encoded = tokenizer(
                    [texts[i] for i in batch], padding=True, truncation=True, max_length=256, return_tensors="pt"
                ).to(device)
                pooled = torch.nn.functional.normalize(
                    mean_pool(model(**encoded).last_hidden_state, encoded["attention_mask"]), dim=1
                )
                loss = torch.nn.functional.cross_entropy(head(pooled), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                curve.append(round(loss.item(), 5))
        model.eval()
        router = Router(head, threshold, (tokenizer, model), device)
    if finetune_encoder:
        accuracy = lambda idx: _accuracy(router, [texts[i] for i in idx], [labels[i] for i in idx])
    else:  # the frozen encoder's embeddings are already on the device: no second encoder pass
        accuracy = lambda idx: float((head(features[idx]).argmax(dim=1) == y[idx]).float().mean()) if idx else None
    details = {
        "train_samples": len(train_idx),
        "heldout_samples": len(held_idx),
        "loss_curve": curve,
        "train_accuracy": accuracy(train_idx),
        "heldout_accuracy": accuracy(held_idx),
    }
    return router, details


def fixed_threshold(config) -> float:
    """The configured threshold, or 0 until `auto` is calibrated on the validation split."""
    return 0.0 if config.router.threshold == "auto" else float(config.router.threshold)


def threshold_override(config) -> float | None:
    """A set `router.threshold`, or None for `auto`: the router then uses the one calibrated on validation (in router.json)."""
    return None if config.router.threshold == "auto" else float(config.router.threshold)


class RouterStage(Stage):
    """The router of one routed strategy, trained on its partition of the training part (never the validation split)."""

    # one per routed strategy, each on its own partition: a run's routers are dealt over the ranks
    placement = Placement.SPREAD

    def __init__(self, strategy: str):
        self.name = f"router/{strategy}"
        self.strategy = strategy

    def requires(self, run):
        from gradientspace.experts.adapters import PartitionStage

        return [PartitionStage(self.strategy)]

    def inputs(self, run) -> dict[str, str]:
        from dataclasses import asdict

        settings = {
            k: v for k, v in asdict(run.config.router).items() if k != "threshold"
        }  # the threshold is chosen after training
        return {
            "router settings": config_hash(settings, run.config.seed),
            "training records": config_hash(sorted(r.id for r in run.training)),
        }

    def run(self, run, key: str, record: dict) -> None:
        from gradientspace.models.loading import pick_device

        config, folder = run.config, get(self.strategy).router_folder(run)
        partition = json.loads((get(self.strategy).folder(run) / "partition.json").read_text())
        records = run.training
        labels = [partition["assignment"][r.id] for r in records]
        router, details = train_router(
            [r.prompt_text for r in records],
            labels,
            len(partition["groups"]),
            pick_device(config.model.device),
            epochs=config.router.epochs if not config.router.finetune_encoder else min(config.router.epochs, 3),
            learning_rate=config.router.learning_rate,
            validation_fraction=config.router.validation_fraction,
            threshold=fixed_threshold(config),
            seed=config.seed,
            finetune_encoder=config.router.finetune_encoder,
        )
        router.save(folder, details)
        add_to_section(record, "router", self.strategy, {k: details[k] for k in ("heldout_accuracy", "train_accuracy")})
        record.update(
            outputs=[
                str((folder / name).relative_to(run.directory.root)) for name in ("router.json", "head.safetensors")
            ],
            heldout_accuracy=details["heldout_accuracy"],
            train_accuracy=details["train_accuracy"],
        )


def train_routers(run, strategies: list[str] | None = None) -> dict:
    """`gradientspace train-router RUN`: one router per routed partition (the gradient clusters first); accuracies on rank 0."""
    from gradientspace.runner import as_run

    run = as_run(run)  # a `runner.Run`, or a config to make one of
    wanted = routed(strategies or run.config.experts.strategies, run.config)
    entries = run.build(*[RouterStage(s) for s in wanted])
    return {s: {k: entry.get(k) for k in ("heldout_accuracy", "train_accuracy")} for s, entry in zip(wanted, entries)}
