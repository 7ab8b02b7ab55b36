"""The run directory: atomic file writes and the JSON manifest every stage reads and writes.

`RUN/manifest.json` holds the config, library versions, and per stage: the hash of the config
sections it depends on, seconds, peak memory, and its outputs. A stage whose recorded hash
matches and whose outputs exist is skipped; any stage can be re-run alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; it replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


def config_hash(*sections: Any) -> str:
    return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()[:16]


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process so far (and of CUDA, when used)."""
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024
    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)}
    if torch.cuda.is_available():
        peak["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def library_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for package in ("gradientspace", "torch", "transformers", "peft", "datasets", "accelerate", "scikit-learn", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


class Run:
    """A run directory and its manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.manifest: dict[str, Any] = {}
        if self.manifest_path.exists():
            try:
                self.manifest = json.loads(self.manifest_path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.manifest_path} is not valid JSON ({err}); move it away to start the run over") from None
        self.manifest.setdefault("stages", {})
        self.manifest.setdefault("metrics", {})

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.manifest_path, self.manifest)

    def set_config(self, config: dict[str, Any]) -> None:
        self.manifest["config"] = config
        self.manifest["versions"] = library_versions()
        self.save()

    def is_done(self, stage: str, key: str) -> bool:
        entry = self.manifest["stages"].get(stage)
        if not entry or entry.get("key") != key or not entry.get("done"):
            return False
        return all(self.path(output).exists() for output in entry.get("outputs", []))

    def stage_entry(self, stage: str) -> dict[str, Any]:
        return self.manifest["stages"].get(stage, {})

    @contextlib.contextmanager
    def stage(self, stage: str, key: str) -> Iterator[dict[str, Any]]:
        """Time a stage; the yielded dict collects its `outputs` and any details to record."""
        start = time.perf_counter()
        record: dict[str, Any] = {"key": key, "outputs": []}
        previous = self.manifest["stages"].get(stage, {})
        if previous.get("key") == key:
            record["seconds_before_resume"] = previous.get("seconds", 0) + previous.get("seconds_before_resume", 0)
        self.manifest["stages"][stage] = {**record, "done": False}
        self.save()
        yield record
        record["seconds"] = round(time.perf_counter() - start, 2)
        record.update(peak_memory_mb())
        record["done"] = True
        self.manifest["stages"][stage] = record
        self.save()
