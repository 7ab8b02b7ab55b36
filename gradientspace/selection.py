"""`gradientspace select RUN --target FILE --top N|P% --out FILE`: the training records most useful for a target task.

The gradient space that clusters the data is the one LESS selects in. Each target record's exact
LoRA gradient is taken where the run took the training records' — at the warm-up adapter, with the
same tokens, normalisation and Adam preconditioning — and expressed in the sketch's basis U
(r coordinates, Uᵀg), where every training record already has its coordinates. A training record
scores the mean cosine similarity of its coordinates to the targets' (LESS with one target task);
the top N (or P %) are written out as the rows of the data file they came from, in its own layout
and columns. Only the targets' gradients are computed: a few seconds for tens of records.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gradientspace.clustering.kmeans import RademacherProjector
from gradientspace.clustering.partitioners import PARTITIONERS
from gradientspace.clustering.stages import gradient_batches
from gradientspace.config import ConfigError, RunConfig
from gradientspace.data.loading import RecordTable, load_records, original_rows
from gradientspace.data.records import Record
from gradientspace.gradients.engine import layout_of, stream_gradients
from gradientspace.models.train import load_adam_state
from gradientspace.runner import Run, as_run
from gradientspace.runs import atomic_path

OUTPUT_SUFFIXES = (".jsonl", ".json", ".parquet")


def parse_top(text: str, available: int) -> int:
    """`--top`: a count (`200`) or a share of the records (`5%`), as a number of records, at least one."""
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise ValueError
            return max(1, math.ceil(share / 100 * available))
        count = int(text)
        if count < 1:
            raise ValueError
        return min(count, available)
    except ValueError:
        raise ConfigError(
            f"--top {text}: give a number of records (200) or a share of them (5%, above 0 and at most 100)"
        ) from None


def target_features(run: Run, records: Sequence[Record], projections: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Each record's gradient at the run's warm-up adapter, as the gradient pass takes it, in the sketch basis (`sketch`,
    T×r) and in each asked random projection (`projection-<k>`, the run's own projector: same seed, same matrix)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = run.config
    loaded = run.model()
    set_peft_model_state_dict(loaded.model, load_file(str(run.path("warmup", "adapter_model.safetensors"))))
    layout = layout_of(loaded.model)
    basis = load_file(str(run.path("sketch.safetensors")))["basis"].to(loaded.device, torch.float32)
    if basis.shape[0] != layout.dim:
        raise ConfigError(
            f"{run.directory.root}: the sketch's basis has {basis.shape[0]} rows but the model's LoRA gradient "
            f"{layout.dim} entries; re-run `gradientspace cluster`"
        )
    adam = (
        load_adam_state(run.path("warmup", "optimizer.safetensors"), layout, loaded.device)
        if config.gradients.adam_precondition
        else None
    )
    projectors = {f"projection-{k}": RademacherProjector(layout.dim, k, seed=config.seed) for k in projections}
    coordinates = np.zeros((len(records), basis.shape[1]), dtype=np.float32)
    _, batches = gradient_batches(list(records), loaded, config)
    for _, indices, grads, _ in stream_gradients(
        loaded.model, batches, loaded.tokenizer.pad_token_id, loaded.device, adam, config.gradients.normalize
    ):
        coordinates[indices] = (grads @ basis).cpu().numpy()
        for projector in projectors.values():
            projector.add(grads, indices)
    features = {"sketch": coordinates}
    for name, projector in projectors.items():
        rows, order = projector.result()
        features[name] = rows[np.argsort(order)].numpy()
    return features


def mean_cosine(pool: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each pool row's cosine similarity to every target row, averaged over the targets (LESS's score for one task)."""
    unit = lambda rows: rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return (unit(pool.astype(np.float64)) @ unit(targets.astype(np.float64)).T).mean(axis=1)


def check_selection_file(out: Path, run_root: Path) -> None:
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out {out}: name a {', '.join(OUTPUT_SUFFIXES)} file")
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out {out}: exists; select never writes over a file, name a new one")
    resolved = out.expanduser().resolve()
    if run_root.resolve() in resolved.parents:
        raise ConfigError(f"--out {out}: lies inside the run directory {run_root}; write it outside")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")


def write_rows(rows: list[dict], out: Path) -> None:
    """Rows in the file type `out` names, written atomically."""
    with atomic_path(out) as tmp:
        if out.suffix == ".parquet":
            from datasets import Dataset

            Dataset.from_list(rows).to_parquet(str(tmp))
        elif out.suffix == ".json":
            tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        else:
            tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def as_rows(records, chosen: list[int], config: RunConfig) -> list[dict]:
    """The chosen records as the user's data file holds them; a built-in recipe's as chat records."""
    if isinstance(records, RecordTable):
        rows = records.rows()
        return original_rows(config.data.path, [rows[i] for i in chosen], config.data.subset, config.data.split)
    return [
        {"id": r.id, "messages": r.messages + [{"role": "assistant", "content": r.response}], "source": r.source}
        for r in (records[i] for i in chosen)
    ]


def select_records(run: Run | RunConfig, target: str, top: str, out: str | Path) -> dict:
    """Rank the run's records by their gradients' mean cosine to the target records' and write the top ones to `out`.

    Returns a summary: how many were chosen, the score range, and the chosen records' label mix where labels exist."""
    from safetensors.torch import load_file

    run = as_run(run)
    config = run.config
    out = Path(out)
    check_selection_file(out, run.directory.root)
    if not run.stage_entry("gradients").get("done") and not PARTITIONERS[config.cluster.method].reads_gradients:
        raise ConfigError(
            f"{run.directory.root}: select ranks records by their gradients, and this run made no gradient pass "
            f"(`cluster.method: {config.cluster.method}` needs none); select from a run made with `--method gradientspace`"
        )
    run.require_clustered("data", "warmup", "gradients")
    targets, _ = load_records(target, columns=config.data.columns)
    records = run.records
    count = parse_top(top, len(records))
    pool = load_file(str(run.path("sketch.safetensors")))["coordinates"].numpy()
    if len(pool) != len(records):
        raise ConfigError(
            f"{run.directory.root}: {len(records)} records but {len(pool)} sketch rows; re-run `gradientspace cluster`"
        )
    scores = mean_cosine(pool, target_features(run, targets)["sketch"])
    chosen = np.argsort(-scores, kind="stable")[:count].tolist()
    write_rows(as_rows(records, chosen, config), out)
    labels: dict[str, int] = {}
    for i in chosen:
        if records[i].source is not None:
            labels[records[i].source] = labels.get(records[i].source, 0) + 1
    return {
        "chosen": count,
        "of": len(records),
        "targets": len(targets),
        "best_score": float(scores[chosen[0]]),
        "last_score": float(scores[chosen[-1]]),
        "labels": dict(sorted(labels.items(), key=lambda kv: -kv[1])),
    }
