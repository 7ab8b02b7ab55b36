"""The run directory, its manifest, and the one runner that decides whether a stage runs.

Every stage of a run (data, warm-up, gradients, cluster, each adapter, each router and its
threshold, the ensemble's centroids, evaluation, report) is a `Stage`: it names its inputs
(hashes of the config sections and of the *content* of the files it reads, and the keys of the
stages it builds on), lists its outputs, and does its work in `run`. `Run.execute(stage)` alone
decides: skip (key unchanged, outputs present), resume (same key, interrupted: the stage's
checkpoints live in folders named by its key, so a changed input never resumes stale state),
or (re-)run, saying which and why in one line. `RUN/manifest.json` holds the config, library
versions, and per stage its inputs, key, seconds, peak memory, when it finished and its
outputs; only rank 0 writes it, atomically.
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
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import torch

from . import distributed


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


class RunError(ValueError):
    """A run directory or one of its files is missing or corrupt; the message names the file."""


def note(message: str) -> None:
    """One line about what a command does (skip / run / resume / re-run and why), from rank 0 only."""
    if distributed.is_main():
        print(message, flush=True)


_SKIPS_SAID: set[tuple[Path, str, str]] = set()


def new_command() -> None:
    """Start a command: its skip lines are said again, once each."""
    _SKIPS_SAID.clear()


class Stage(ABC):
    """One step of a run. Subclasses hold what they need (config, records, model) and declare the rest."""

    name: str
    always = False  # a stage that is cheap and reads everything (the report) runs every time

    @abstractmethod
    def inputs(self) -> dict[str, str]:
        """What the stage reads, by name → hash; the key is hashed from these and the names say what changed."""

    @abstractmethod
    def run(self, key: str, record: dict[str, Any]) -> None:
        """Do the work. Checkpoints go in folders named by `key`; `record` collects `outputs` (paths in the run) and details."""


class Run:
    """A run directory and its manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.reload()

    def reload(self) -> None:
        """Read the manifest from disk (another `Run` of this directory, or rank 0, may have written since)."""
        self.manifest: dict[str, Any] = {}
        if self.manifest_path.exists():
            try:
                self.manifest = json.loads(self.manifest_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RunError(f"{self.manifest_path} is not valid JSON ({err}); move it away to start the run over") from None
            if not isinstance(self.manifest, dict) or not isinstance(self.manifest.get("stages", {}), dict):
                raise RunError(f"{self.manifest_path}: expected an object with a `stages` mapping; move it away to start the run over")
        self.manifest.setdefault("stages", {})
        self.manifest.setdefault("metrics", {})

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def save(self) -> None:
        if not distributed.is_main():  # under torchrun, one writer: rank 0
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.manifest_path, self.manifest)

    def set_config(self, config: dict[str, Any]) -> None:
        self.manifest["config"] = config
        self.manifest["versions"] = library_versions()
        self.save()

    def missing_outputs(self, stage: str) -> list[str]:
        return [output for output in self.stage_entry(stage).get("outputs", []) if not self.path(output).exists()]

    def is_done(self, stage: str, key: str, inputs: dict[str, Any] | None = None) -> bool:
        """Whether `stage` can be skipped; says so, or says why it runs, in one line.

        `inputs` (name → hash) lets the line name what changed, e.g. `re-run gradients: warm-up changed`.
        """
        entry = self.stage_entry(stage)
        missing = self.missing_outputs(stage)
        if entry.get("key") == key and entry.get("done") and not missing:
            if (self.root.resolve(), stage, key) not in _SKIPS_SAID:  # several stages reload the data: say it once
                _SKIPS_SAID.add((self.root.resolve(), stage, key))
                note(f"skip {stage}: done, key {key[:8]}")
            return True
        if not entry:
            note(f"run {stage}: not done yet")
        elif entry.get("key") == key and not entry.get("done"):
            note(f"resume {stage}: interrupted earlier, inputs unchanged (key {key[:8]})")
        elif entry.get("key") == key:
            note(f"re-run {stage}: output {missing[0]} is missing")
        else:
            before = entry.get("inputs") or {}
            changed = [name for name, value in (inputs or {}).items() if name in before and before[name] != value]
            why = f"{', '.join(changed)} changed" if changed else "its inputs changed"
            note(f"re-run {stage}: {why} (key {str(entry.get('key'))[:8]} → {key[:8]})")
        return False

    def require(self, stage: str, hint: str) -> None:
        """Stop with one line when a stage another command needs has not finished (or lost its outputs)."""
        entry = self.stage_entry(stage)
        if not entry.get("done"):
            raise RunError(f"{self.root}: stage `{stage}` has not finished; {hint}")
        missing = self.missing_outputs(stage)
        if missing:
            raise RunError(f"{self.path(missing[0])} is missing (an output of stage `{stage}`); {hint}")

    def execute(self, stage: Stage) -> dict[str, Any]:
        """Run `stage` unless it is done with the same inputs (said in one line either way); returns its manifest entry."""
        if stage.always:
            note(f"run {stage.name}: redone every time (it is cheap and reads every other stage)")
            inputs, key = {}, "always"
        else:
            inputs = stage.inputs()
            key = config_hash(inputs)
            if self.is_done(stage.name, key, inputs):
                return self.stage_entry(stage.name)
        with self.stage(stage.name, key, inputs) as record:
            stage.run(key, record)
        return record

    def stage_entry(self, stage: str) -> dict[str, Any]:
        return self.manifest["stages"].get(stage, {})

    @contextlib.contextmanager
    def stage(self, stage: str, key: str, inputs: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Time a stage; the yielded dict collects its `outputs` and any details to record."""
        start = time.perf_counter()
        record: dict[str, Any] = {"key": key, "outputs": []}
        if inputs is not None:
            record["inputs"] = inputs
        previous = self.manifest["stages"].get(stage, {})
        if previous.get("key") == key:
            record["seconds_before_resume"] = previous.get("seconds", 0) + previous.get("seconds_before_resume", 0)
        self.record_stage(stage, {**record, "done": False})
        yield record
        record["seconds"] = round(time.perf_counter() - start, 2)
        record.update(peak_memory_mb())
        record["done"] = True
        record["finished_at"] = time.time()  # lets `run` tell stages it ran from stages it skipped
        self.record_stage(stage, record)

    def record_stage(self, stage: str, entry: dict[str, Any]) -> None:
        """Write one stage's entry over the manifest as it is on disk now, so no other stage's entry is lost.

        Rank 0 writes; a stage another rank ran reaches the manifest when rank 0 records its gathered entry.
        """
        if distributed.is_main():
            self.reload()
        self.manifest["stages"][stage] = entry
        self.save()
