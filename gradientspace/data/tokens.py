"""Records as token ids: the prompt / response split read off the chat template, truncation, length batches, padding.

Tokenising a `RecordTable` is another cached `datasets` map (`tokenize_dataset`), and the gradient
pass batches straight from its Arrow columns.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from gradientspace.data.loading import RecordTable, datasets_progress
from gradientspace.data.records import Record

IGNORE = -100


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

    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        if isinstance(index, slice):  # a list's slice, as callers batching by position take one
            return [self[i] for i in range(*index.indices(len(self)))]
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
