"""The run directory, its manifest, the `Stage` interface, and the decision whether a stage runs.

Every stage of a run (data, warm-up, gradients, cluster, each partition and adapter, each router,
keep decision and threshold, the ensemble's centroids, evaluation, report) is a `Stage`: it names
the stages it requires, where it runs under torchrun, its own inputs (hashes of the config
sections and of the *content* of the files it reads), lists its outputs, and does its work in
`run`. `runner.Run.build` orders the stages and adds the parents' keys to each stage's inputs;
`RunDirectory.execute(stage)` alone decides: skip (key unchanged, outputs present and as written),
resume (same key, interrupted: the stage's checkpoints live in folders named by its key, so a
changed input never resumes stale state), or (re-)run, saying which and why in one line.
`RUN/manifest.json` holds the config, library versions, and per stage its inputs, key, seconds,
peak memory, when it finished, its outputs and their digests; only rank 0 writes it, atomically.

Outputs are verified, not trusted. Each output file's size, modification time and SHA-256 are
recorded when its stage finishes (one read of what was just written; at 8 B scale an adapter is
tens of MB, a second or less). Before a stage is skipped, each output's size and modification time
are compared with the record, and only a file whose time changed is hashed again (a file rewritten
with the same bytes is still the stage's); a changed one re-runs the stage, naming the file. If the
rebuilt outputs differ from the ones recorded, the stage's entry gets a `content` digest that its
dependents' keys include (`content_key`), so exactly the stages that read it are rebuilt; a stage
whose rebuild reproduces its outputs byte for byte leaves its dependents done. A file that a later
stage rewrites on purpose (the threshold stage adds the threshold to `router.json`) has its digest
refreshed in every entry that lists it.

A run directory is the project's alone: a command writes only into a new or empty folder or
into a run (a folder whose manifest is one this module wrote, `is_run_manifest`), and while it
works rank 0 holds `RUN/.lock` (`RunLock`, an OS lock: released however the process ends, even
by SIGKILL), so a second command on the same run stops at once, naming the process that holds it.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import os
import platform
import resource
import shlex
import socket
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from gradientspace import distributed


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
    for package in (
        "gradientspace",
        "torch",
        "transformers",
        "peft",
        "datasets",
        "accelerate",
        "scikit-learn",
        "safetensors",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def file_digest(path: Path) -> dict[str, Any]:
    """What an output looked like when written: its size, modification time and SHA-256 — of a safetensors file, with its
    header's keys sorted (safetensors writes its metadata in a random order, so equal tensors need not be equal bytes)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        if path.suffix == ".safetensors":
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            try:
                sha.update(json.dumps(json.loads(handle.read(length)), sort_keys=True).encode())
            except ValueError:  # not a whole header: hash the bytes as they are
                handle.seek(0)
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha.hexdigest()}


def content_key(entry: dict[str, Any]) -> str:
    """What a stage gives its dependents' keys: its key, and the digest of its outputs once a rebuild changed them."""
    return str(entry.get("key")) + (f":{entry['content']}" if entry.get("content") else "")


class RunError(ValueError):
    """A run directory or one of its files is missing or corrupt; the message names the file."""


class RunBusy(RunError):
    """Another process holds the run's lock; the message names it."""


def note(message: str) -> None:
    """One line about what a command does (skip / run / resume / re-run and why), from rank 0 only."""
    if distributed.is_main():
        print(message, flush=True)


def warn(message: str) -> None:
    """One line on stderr about a result the user should look at (the run goes on), from rank 0 only."""
    if distributed.is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)


LOCK_NAME = ".lock"
RUN_MANIFEST_FIELDS = ("config", "stages")  # what every manifest a run wrote has (`set_config` is its first write)


def is_run_manifest(manifest: Any) -> bool:
    """Whether a parsed manifest.json is one a run wrote."""
    return isinstance(manifest, dict) and all(isinstance(manifest.get(name), dict) for name in RUN_MANIFEST_FIELDS)


def _program() -> str:
    """How the user started this process: `gradientspace` for the console script and for `python -m gradientspace.cli` alike."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "gradientspace" if spec is not None and spec.name == "gradientspace.cli" else Path(sys.argv[0]).name


class RunLock:
    """`RUN/.lock`, held with `flock` by one process at a time; the file says who holds it.

    The kernel drops a `flock` when its process ends in any way (SIGKILL included), so a stale
    lock cannot outlive a crash, unlike a pid file; the pid, command and start time written into
    the file serve only to name the holder to a command that finds the run busy, as a database
    names the process holding a lock. The file itself stays (deleting it would let a process that
    opened the old file and one that creates a new one both hold "the" lock).
    """

    def __init__(self, root: str | Path):
        self.path = Path(root) / LOCK_NAME
        self.handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read()
            handle.close()
            raise RunBusy(
                f"{self.path.parent} is in use by {self._describe(holder)}; wait for it to finish (or stop it), then run this command again"
            ) from None
        except OSError as err:  # a filesystem without working locks: NFS mounted `nolock`, Lustre without `-o flock`
            handle.close()
            raise RunError(
                f"cannot lock {self.path}: flock failed ({err.strerror}) on its {filesystem_of(self.path)} filesystem; "
                "mount it with locking (NFS: without `nolock`; Lustre: `-o flock`) or put the run directory on a filesystem that has it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "command": shlex.join([_program(), *sys.argv[1:]]),
                }
            )
            + "\n"
        )
        handle.flush()
        self.handle = handle

    @staticmethod
    def _describe(holder: str) -> str:
        try:
            info = json.loads(holder)
            return f"process {info['pid']} on {info['host']} (`{info['command']}`, started {info['started']})"
        except (json.JSONDecodeError, KeyError, TypeError):  # the holder has the lock but has not written its name yet
            return "another process"

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the file drops the flock
            self.handle = None


def filesystem_of(path: Path) -> str:
    """The type of the filesystem `path` lies on (`nfs4`, `lustre`, `ext4`…), read from /proc/mounts; `unknown` elsewhere."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines() if len(line.split()) > 2]
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    found = [
        (point, kind) for point, kind in mounts if resolved == point or resolved.startswith(point.rstrip("/") + "/")
    ]
    return max(found, key=lambda item: len(item[0]))[1] if found else "unknown"


@contextlib.contextmanager
def locked(root: str | Path) -> Iterator[None]:
    """Hold the run's lock for the block: rank 0 takes it, and every rank learns whether it did.

    Under torchrun the other ranks do not touch the file; they take rank 0's outcome, so when
    the run is busy every rank stops with the same line instead of waiting at a barrier for a
    rank 0 that has left.
    """
    distributed.init()
    lock = RunLock(root) if distributed.is_main() else None
    refusal = None
    if lock is not None:
        try:
            lock.acquire()
        except RunError as err:  # busy, or a filesystem that cannot lock: every rank stops with the same line
            refusal = (isinstance(err, RunBusy), str(err))
        except OSError as err:  # the folder or the lock file cannot be made or written (permissions, a full disk)
            refusal = (False, f"cannot take the run's lock {lock.path}: {err.strerror or err}")
    refusal = distributed.from_main(refusal)
    if refusal:
        busy, message = refusal
        raise (RunBusy if busy else RunError)(message)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


_SKIPS_SAID: set[tuple[Path, str, str]] = set()


def new_command() -> None:
    """Start a command: its skip lines are said again, once each."""
    _SKIPS_SAID.clear()


class Placement(enum.Enum):
    """Where a stage runs under torchrun; the runner (`runner.Run.build`) makes the other ranks wait, never the stage."""

    MAIN = "rank 0"  # rank 0 runs it while the others wait, then every rank reads what it wrote
    EVERY = "every rank"  # every rank runs it on its own shard of the work (the gradient pass, the evaluation)
    SPREAD = "spread"  # sibling stages built together are dealt over the ranks by their `work` (the adapters after the generalist, the routers, keep decisions and thresholds)


class Stage(ABC):
    """One step of a run: what it requires, where it runs, what it reads, what it does.

    A stage's key is hashed from its own `inputs` (config sections, the content of files it reads
    from outside the run) and the keys of every stage it `requires`, added by the runner: a stage
    that reads another's output can never keep a key that ignores it.
    """

    name: str
    placement = Placement.MAIN
    always = False  # a stage that is cheap and reads everything (the report) runs every time

    def requires(self, run) -> Iterable[Stage | list[Stage]]:
        """The stages this one reads, built before it in the order given; a list is built together (and spread, if they may
        be). A generator may look at the run between its items: the experts' stages exist only once the clusters do."""
        return ()

    def work(self, run) -> float:
        """How much work the stage is beside its SPREAD siblings: the runner deals the largest to the least-loaded rank
        first, so one long stage does not leave a rank idle while the other trains the rest."""
        return 1.0

    @abstractmethod
    def inputs(self, run) -> dict[str, str]:
        """What the stage reads besides other stages, by name → hash: its config sections, the content of outside files."""

    @abstractmethod
    def run(self, run, key: str, record: dict[str, Any]) -> None:
        """Do the work. Checkpoints go in folders named by `key`; `record` collects `outputs` (paths in the run) and details."""


# a stage record's summary items: moved into the manifest's own sections when the entry is recorded
SECTIONS = "sections"


def add_to_section(record: dict[str, Any], section: str, name: str, value: Any) -> None:
    """One item of a summary section of the manifest (`experts`, `router`: one per strategy), carried by the stage's
    `record` and written with its entry: on rank 0 when the stage ends, or when rank 0 records the entry of a stage
    another rank ran (a SPREAD stage), so no rank's summary is lost."""
    record.setdefault(SECTIONS, {}).setdefault(section, {})[name] = value


def read_manifest(path: Path) -> dict[str, Any]:
    """A run's `manifest.json` (empty if there is none); one line naming the file if it is not a manifest."""
    if not path.exists():
        return {"stages": {}}
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not valid JSON ({err}); move it away to start the run over") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
        raise RunError(f"{path}: expected an object with a `stages` mapping; move it away to start the run over")
    return manifest


class RunDirectory:
    """A run directory and its manifest: what a run wrote, readable without its config (serving, reports)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.reload()

    def reload(self) -> None:
        """Read the manifest from disk (rank 0, or another process, may have written since)."""
        self.manifest = read_manifest(self.manifest_path)
        self.manifest.setdefault("stages", {})

    def share_main(self) -> None:
        """Under torchrun, every rank takes the manifest as rank 0 holds it, sent rather than re-read: on a filesystem
        shared between nodes with attribute caching (NFS), another node may read an older manifest for a while."""
        self.manifest = distributed.from_main(self.manifest)

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

    def changed_outputs(self, stage: str) -> list[str]:
        """The outputs whose bytes are no longer those the stage wrote: size first, then SHA-256 where the time moved."""
        changed = []
        for output, written in self.stage_entry(stage).get("digests", {}).items():
            path = self.path(output)
            if not path.is_file():
                changed.append(output)
                continue
            stat = path.stat()
            if stat.st_size != written["size"] or (
                stat.st_mtime_ns != written["mtime_ns"] and file_digest(path)["sha256"] != written["sha256"]
            ):
                changed.append(output)
        return changed

    def verify(self, hint: str) -> None:
        """Stop with one line naming the first output of a finished stage that is no longer as its stage wrote it: for the
        commands that only read a run (serve, route, backend-command, generate, report), which rebuild nothing."""
        for stage, entry in self.manifest["stages"].items():
            changed = self.changed_outputs(stage) if entry.get("done") else []
            if changed:
                raise RunError(
                    f"{self.path(changed[0])} changed since stage `{stage}` wrote it (truncated or edited); {hint}"
                )

    def digests(self, outputs: list[str]) -> dict[str, dict[str, Any]]:
        return {output: file_digest(self.path(output)) for output in outputs if self.path(output).is_file()}

    def is_done(self, stage: str, key: str, inputs: dict[str, Any] | None = None) -> bool:
        """Whether `stage` can be skipped; says so, or says why it runs, in one line.

        `inputs` (name → hash) lets the line name what changed, e.g. `re-run gradients: warm-up changed`.
        """
        entry = self.stage_entry(stage)
        missing = self.missing_outputs(stage)
        changed = self.changed_outputs(stage) if entry.get("key") == key and entry.get("done") and not missing else []
        if entry.get("key") == key and entry.get("done") and not missing and not changed:
            if (
                self.root.resolve(),
                stage,
                key,
            ) not in _SKIPS_SAID:  # several targets of one command share stages: say it once
                _SKIPS_SAID.add((self.root.resolve(), stage, key))
                note(f"skip {stage}: done, key {key[:8]}")
            return True
        if not entry:
            note(f"run {stage}: not done yet")
        elif entry.get("key") == key and not entry.get("done"):
            note(f"resume {stage}: interrupted earlier, inputs unchanged (key {key[:8]})")
        elif entry.get("key") == key and missing:
            note(f"re-run {stage}: output {missing[0]} is missing")
        elif entry.get("key") == key:
            note(f"re-run {stage}: output {changed[0]} changed since it was written")
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

    def execute(self, stage: Stage, inputs: dict[str, str], run) -> dict[str, Any]:
        """Run `stage` (with `inputs`, its own and its parents' keys) unless it is done with the same inputs (said in one
        line either way); returns its manifest entry. Only the runner calls this."""
        if stage.always:
            note(f"run {stage.name}: redone every time (it is cheap and reads every other stage)")
            inputs, key = {}, "always"
        else:
            key = config_hash(inputs)
            if self.is_done(stage.name, key, inputs):
                return self.stage_entry(stage.name)
        with self.stage(stage.name, key, inputs) as record:
            stage.run(run, key, record)
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
        # what the outputs were before this run, kept through an interruption, to tell whether the rebuild changed them
        written_before = (
            (previous.get("digests") or previous.get("digests_before") or {}) if previous.get("key") == key else {}
        )
        self.record_stage(
            stage, {**record, "done": False, **({"digests_before": written_before} if written_before else {})}
        )
        yield record
        record["seconds"] = round(time.perf_counter() - start, 2)
        record.update(peak_memory_mb())
        record["done"] = True
        record["finished_at"] = time.time()  # lets `run` tell stages it ran from stages it skipped
        # a stage redone every time (the report, also redrawn by the read-only `report` command) has nothing to verify
        record["digests"] = self.digests(record["outputs"]) if key != "always" else {}
        before = {output: d["sha256"] for output, d in written_before.items()}
        if before and before != {output: d["sha256"] for output, d in record["digests"].items()}:
            # rebuilt with the same inputs into other bytes (a corrupt output replaced): what read the old ones is stale
            record["content"] = config_hash(record["digests"])
        self.record_stage(stage, record)

    def record_stage(self, stage: str, entry: dict[str, Any]) -> None:
        """Write one stage's entry over the manifest as it is on disk now, so no other stage's entry is lost.

        Rank 0 writes; a stage another rank ran reaches the manifest when rank 0 records its gathered entry, with the
        summary items it added (`add_to_section`).
        """
        if distributed.is_main():
            self.reload()
        for other in self.manifest[
            "stages"
        ].values():  # a file this stage rewrote on purpose is now as this stage left it
            for output in set(other.get("digests", {})) & set(entry.get("digests", {})):
                other["digests"][output] = entry["digests"][output]
        for section, items in entry.get(SECTIONS, {}).items():
            self.manifest.setdefault(section, {}).update(items)
        self.manifest["stages"][stage] = {name: value for name, value in entry.items() if name != SECTIONS}
        self.save()
