"""The ELREA ensemble's centroids: each gradient cluster's mean unit instruction-token gradient at the generalist.

`elrea-ensemble` weighs every expert of a prompt by how its own gradient resembles each cluster's
centroid; `CentroidStage` computes them once the routed partition and the generalist exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradientspace.data.tokens import collate, tokenize
from gradientspace.experts.adapters import AdapterStage, PartitionStage, generalist_folder
from gradientspace.experts.strategies import GENERALIST, ROUTED, get
from gradientspace.gradients.engine import PerSampleGradients, transform
from gradientspace.routing.model import StrategyModel
from gradientspace.runner import Run
from gradientspace.runs import Stage, atomic_path


def compute_elrea_centroids(command_run: Run) -> Path:
    """Mean unit instruction-token gradient (w.r.t. the generalist, ELREA's base) of each gradient cluster, plus of all data,
    on the run's one adapter bank."""
    config, records, run = command_run.config, command_run.records, command_run.directory
    path = run.path("elrea", "centroids.safetensors")
    partition = json.loads((get(ROUTED).folder(run) / "partition.json").read_text())
    groups, labels = partition["groups"], [partition["assignment"][r.id] for r in records]
    generalist = StrategyModel.adapter_name(GENERALIST, "0")
    bank = command_run.bank(generalist, generalist_folder(run))
    bank.model.set_adapter(generalist)
    model, device, tokenizer = bank.model, bank.device, bank.tokenizer
    examples = tokenize(records, tokenizer, config.data.max_length, "instruction")
    sums = None
    with PerSampleGradients(model) as engine:
        for start in tqdm(range(0, len(examples), 8), desc="elrea centroids", dynamic_ncols=True):
            batch = examples[start : start + 8]
            grads, _ = engine.batch(*(t.to(device) for t in collate(batch, tokenizer.pad_token_id)))
            grads = transform(grads, None, normalize=True)
            if sums is None:
                sums = torch.zeros(len(groups) + 1, grads.shape[1], device=device, dtype=torch.float64)
            for example, row in zip(batch, grads):
                sums[labels[example.index]] += row
                sums[-1] += row
    counts = torch.bincount(torch.tensor(labels), minlength=len(groups)).tolist() + [len(records)]
    centroids = (
        (sums / torch.tensor(counts, device=device, dtype=torch.float64).clamp(min=1).unsqueeze(1)).float().cpu()
    )
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"centroids": centroids.contiguous()}, str(tmp))
    return path


class CentroidStage(Stage):
    """The ELREA ensemble's per-cluster mean gradients (w.r.t. the generalist)."""

    name = "elrea-centroids"

    def requires(self, run: Run):
        return [PartitionStage(ROUTED), AdapterStage(GENERALIST, "0")]

    def inputs(self, run: Run) -> dict[str, str]:
        return {}

    def run(self, run: Run, key: str, record: dict) -> None:
        compute_elrea_centroids(run)
        record["outputs"] = ["elrea/centroids.safetensors"]
