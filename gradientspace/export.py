"""`gradientspace export RUN --out DIR`: what a run learnt about its data, in the formats other tools read.

    DIR/records/                a `datasets` folder (or records.parquet / records.jsonl): every training record
                                (id, source, messages, response, split) with its cluster, its sketch coordinates and,
                                once experts are decided, the adapter that would serve it
    DIR/clusters.json           each cluster's size and most distinctive terms
    DIR/sketch/coordinates.npy  the N×r sketch coordinates (row i = record i of records/), a plain .npy that
                                `numpy.load(mmap_mode="r")` maps, as LESS, TRAK and bergson leave gradient features
    DIR/sketch/info.json        shape, dtype, rank, the basis they are coordinates in, the model, the stage key

The coordinates exist where the run made the gradient pass: a run clustered by `cluster.method: embedding` (the
default) has none, and its export holds the records, their clusters and adapters, without the column and sketch/.

A record's coordinates are Uᵀg: its normalised LoRA gradient (at the warm-up adapter) in the
sketch's top-r left singular vectors U, which stay in `RUN/sketch.safetensors` (d×r: at d ≈ 2·10⁷
too large to copy by default). The export is written beside DIR and renamed into place, so DIR is
either whole or absent; an existing non-empty DIR is never written into.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from gradientspace.config import ConfigError, RunConfig
from gradientspace.experts.adapters import read_partition
from gradientspace.experts.strategies import ROUTED
from gradientspace.runner import Run, as_run
from gradientspace.runs import content_key, note, write_json

FORMATS = ("datasets", "parquet", "jsonl")


def check_export_folder(out: Path, run_root: Path) -> None:
    """DIR is new or empty, and outside the run (whose files only the run writes)."""
    resolved, root = out.expanduser().resolve(), run_root.resolve()
    if resolved == root or root in resolved.parents:
        raise ConfigError(f"--out {out}: lies inside the run directory {run_root}; export to a folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"--out {out}: exists and is not an empty folder; the export never writes over files, choose a new folder"
        )


def _columns(run: Run, strategy: str) -> tuple[dict[str, list], np.ndarray | None, dict]:
    """The records' columns, their sketch coordinates (N×r, dataset order; None where the run made no gradient pass) and
    each cluster's summary."""
    from safetensors.torch import load_file

    from gradientspace.routing.model import served_adapters

    records = run.records
    clusters = [json.loads(line)["cluster"] for line in run.path("clusters.jsonl").read_text().splitlines()]
    coordinates = (
        load_file(str(run.path("sketch.safetensors")))["coordinates"].float().numpy()
        if run.stage_entry("gradients").get("done")
        else None
    )
    rows = len(records) if coordinates is None else len(coordinates)
    if not len(records) == len(clusters) == rows:
        raise ConfigError(
            f"{run.directory.root}: {len(records)} records, {len(clusters)} cluster assignments and {rows} "
            "sketch rows do not match; re-run `gradientspace cluster` on it"
        )
    columns = {
        "id": [r.id for r in records],
        "source": [r.source for r in records],
        "messages": [r.messages for r in records],
        "response": [r.response for r in records],
        "split": ["validation" if r.id in run.validation_ids else "train" for r in records],
        "cluster": clusters,
    }
    partitioned = run.stage_entry(f"partition/{strategy}").get("inputs", {}).get("stage cluster")
    if partitioned not in (
        None,
        content_key(run.stage_entry("cluster")),
    ):  # experts of clusters made before a re-cluster
        note(
            f"export: no `adapter` column: {strategy}'s experts were trained on an earlier clustering; run `gradientspace run` again"
        )
    elif run.stage_entry(f"adapters/{strategy}").get(
        "done"
    ):  # the group's expert where served, else the fall-back, as serve names them
        served = served_adapters(run, strategy)
        by_group = {adapter.name.removeprefix("expert-"): adapter.name for adapter in served if not adapter.is_fallback}
        partition = read_partition(run, strategy)
        fallback = served[-1].name
        columns["adapter"] = [
            by_group.get(partition["groups"][partition["assignment"][r.id]], fallback) for r in records
        ]
    terms = run.stage_entry("cluster").get("terms", {})
    summary = {
        str(k): {"size": int(size), "terms": terms.get(str(k), [])} for k, size in enumerate(np.bincount(clusters))
    }
    return columns, coordinates, summary


def export_run(run: Run | RunConfig, out: str | Path, fmt: str = "datasets", strategy: str = ROUTED) -> Path:
    """Write the export of the run `config.out` into `out` (see the module's help); returns `out`."""
    from datasets import Dataset, Features, List, Value

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    run = as_run(run)
    out = Path(out)
    check_export_folder(out, run.directory.root)
    run.require_clustered("data", "cluster")
    columns, coordinates, summary = _columns(run, strategy)
    if coordinates is not None:
        columns["coordinates"] = coordinates.tolist()
    features = Features(
        {
            "id": Value("string"),
            "source": Value("string"),
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "response": Value("string"),
            "split": Value("string"),
            "cluster": Value("int32"),
            **({"coordinates": List(Value("float32"), length=coordinates.shape[1])} if coordinates is not None else {}),
            **({"adapter": Value("string")} if "adapter" in columns else {}),
        }
    )
    dataset = Dataset.from_dict(columns, features=features)

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if fmt == "datasets":
        dataset.save_to_disk(str(partial / "records"))
    elif fmt == "parquet":
        dataset.to_parquet(str(partial / "records.parquet"))
    else:
        dataset.to_json(str(partial / "records.jsonl"), lines=True, force_ascii=False)
    if coordinates is not None:
        write_sketch(run, coordinates, partial / "sketch")
    write_json(partial / "clusters.json", {"method": run.stage_entry("cluster").get("method"), "clusters": summary})
    if out.exists():
        out.rmdir()  # empty, as checked
    partial.rename(out)
    return out


def write_sketch(run: Run, coordinates: np.ndarray, folder: Path) -> None:
    """The records' sketch coordinates as a memory-mappable .npy, and what they are coordinates in."""
    folder.mkdir()
    np.save(folder / "coordinates.npy", np.ascontiguousarray(coordinates, dtype=np.float32))
    gradients = run.stage_entry("gradients")
    write_json(
        folder / "info.json",
        {
            "shape": list(coordinates.shape),
            "dtype": "float32",
            "rank": coordinates.shape[1],
            "rows": "the records of records/, in order (column `id`)",
            "basis": {
                "file": str(run.path("sketch.safetensors").resolve()),
                "tensor": "basis",
                "dim": gradients.get("dim"),
                "what": "top-r left singular vectors U (d×r) of the normalised per-sample LoRA gradients; coordinates = Uᵀg",
            },
            "captured_energy": gradients.get("captured_energy"),
            "model": run.config.model.name,
            "lora_rank": run.config.model.lora_rank,
            "gradient_tokens": run.config.gradients.tokens,
            "config_key": gradients.get("key"),
            "run": str(run.directory.root.resolve()),
        },
    )
