"""A training record: its fields, the layouts people keep instruction data in and how each becomes one, and the validation split.

A record is in one of these layouts, with an optional `id` and an optional `source` label (`source`
is only ever read by evaluation code):

| layout | fields |
| --- | --- |
| Alpaca | `instruction`, optional `input`, `output` |
| chat | `messages`: {role, content} turns ending with the assistant's answer |
| TRL prompt–completion | `prompt` and `completion`, each a string or a list of {role, content} turns |
| ShareGPT | `conversations`: {from, value} turns (`human`, `gpt`, `system`) ending with `gpt`'s answer |

The chat-like layouts become `messages` (`_as_messages`); a record in none of them is refused
naming the fields it has and the layouts accepted. Columns named otherwise are mapped by
`data.columns` (field → column, `{instruction: question, output: answer}`) before the layout is read.

Text must be UTF-8 (a leading byte-order mark, as Excel and Notepad write, is dropped): a line that
is not is a bad record like any other (`file:line: not valid UTF-8 (byte 0xE9 at column 12)`),
named, and skipped and counted under `--skip-bad`. A UTF-16 or UTF-32 file is refused whole. Lone
surrogates (`"\ud800"` in the JSON) are refused by field.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


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
