"""The serving engine: one worker thread owns the model; requests that arrive together decode together.

The worker takes the first waiting request, waits `batch_window` seconds for more (at most
`max_batch_size`), routes the unpinned ones in one router pass (`StrategyModel.choose`), and
decodes the whole batch in ONE call of the adapter bank's decoding path (`models.bank.AdapterBank.decode`,
the one `evaluate` and `generate` use): a batch on one adapter through peft's single-adapter path,
rows bound for different adapters through the bank's `StackedLoRA`.
Batches are static: a request that arrives while a batch decodes joins the next one.

One request fails at a time. `submit` checks everything a request could break a batch with (an
empty prompt, a token outside the vocabulary, a seed `torch.Generator` refuses, a full queue)
and raises before the request joins the queue. Whatever still fails inside a batch — the router,
`generate`, or a request's own consumer raising — is retried by halves: the rows not yet finished
are decoded again in two groups, each row resuming from its own prompt plus the tokens it has
already sent (so a client never sees text twice, and a greedy row's text is unchanged), until
the failing group is a single row; only that request gets an `error`.

Per row, inside that one call:
- `RowStops` (a StoppingCriteria) takes each row's newest token, detokenises it incrementally,
  sends the new text to that row's consumer, and ends the row at end-of-sequence, `max_tokens`,
  a `stop` string, or when its client went away (`Request.cancel`). A stopping criterion sees the
  new token in every transformers version, whereas a streamer's place relative to the stop check
  changed in 5.x (it now runs after it), which would cost a finished row one extra step.
- `RowSampler` (a LogitsProcessor) makes sampling per row too, so requests with different
  temperature / top_p / seed share a batch: `generate` runs greedy, and a sampling row's scores
  are replaced by the single token it draws (transformers' temperature and top-p warpers, then a
  multinomial draw from the request's own `torch.Generator`). A request with a `seed` therefore
  gives the same text whatever it is batched with (up to floating-point differences between
  batch shapes); without one it draws fresh randomness. Temperature 0 is greedy.
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from gradientspace.data.records import Record
from gradientspace.data.tokens import prompt_text
from gradientspace.experts.strategies import ROUTED
from gradientspace.routing.model import StrategyModel, served_adapters, serving_names


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def generator(self) -> torch.Generator:
        """This request's own randomness; a seed outside torch's 64-bit range raises ValueError here, before the request is queued."""
        return torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))


@dataclass
class Route:
    """Which adapter answers a request: its public model id, the router's expert id and top probability."""

    model: str
    expert: int | str
    probability: float
    pick: int | None = None  # the router's top group before its threshold (None: pinned, or no router)
    fallback: str | None = (
        None  # why the fall-back adapter answers (`strategies.BELOW_THRESHOLD`, `NOT_SERVED`), else None
    )


@dataclass
class Request:
    """One generation request and what the worker reports back through `emit(kind, value)`.

    Kinds, in order: `route` (a Route), any number of `text` (str), then `done` (the finish
    reason: stop | length | cancelled) or `error` (a message); `done` or `error` may come first.
    """

    record: Record  # its prompt text is what the router reads
    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[str, object], None]
    pinned: str | None = None  # a public model id; None = let the router choose
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    routing_seconds: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    completion_tokens: int = 0
    generator: torch.Generator | None = None  # set by `Engine.submit`

    def cancel(self) -> None:
        self.cancelled.set()


class _Row:
    """Decoding state of one request inside a batch."""

    def __init__(self, request: Request, adapter: str, tokenizer, eos_ids: set[int]):
        self.request, self.adapter, self.tokenizer, self.eos_ids = request, adapter, tokenizer, eos_ids
        self.tokens: list[int] = []  # sent so far: a retried row resumes from prompt + tokens
        self.sent = 0  # characters of the decoded text already emitted
        self.finish: str | None = None
        self.generator = request.generator

    def input_ids(self) -> list[int]:
        return self.request.prompt_ids + self.tokens

    def tokens_left(self) -> int:
        return self.request.sampling.max_tokens - len(self.tokens)

    def push(self, token: int) -> None:
        if self.finish is not None:
            return  # generate pads rows that are done
        request = self.request
        if request.first_token is None:
            request.first_token = time.perf_counter()
        if request.cancelled.is_set():
            return self._end("cancelled")
        request.completion_tokens += 1
        if token in self.eos_ids:
            return self._end("stop")
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        stops = [i for i in (text.find(s, max(self.sent - len(s), 0)) for s in request.sampling.stop) if i >= 0]
        if stops:
            self._send(text[: min(stops)])
            return self._end("stop")
        if len(self.tokens) >= request.sampling.max_tokens:
            self._send(text)
            return self._end("length")
        self._send(text[: len(text) - _held_back(text, request.sampling.stop)])

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.request.emit("text", text[self.sent :])
            self.sent = len(text)

    def _end(self, reason: str) -> None:
        """Finish the row now, so its client has its answer before the rest of the batch is done."""
        self.finish = reason
        self.request.finished = time.perf_counter()
        self.request.emit("done", reason)

    def end_at_length(self) -> None:
        self._send(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        self._end("length")

    def fail(self, err: Exception) -> None:
        self.finish = "error"
        _tell_error(self.request, err)


def _tell_error(request: Request, err: Exception) -> None:
    request.finished = time.perf_counter()
    with contextlib.suppress(Exception):  # the request's own consumer may be what failed
        request.emit("error", f"{type(err).__name__}: {err}")


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to send yet: an unfinished UTF-8 character, or the start of a stop string."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                held = max(held, k)
                break
    return held


class RowStops(StoppingCriteria):
    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            row.push(token)
        return torch.tensor([row.finish is not None for row in self.rows], device=input_ids.device)


class RowSampler(LogitsProcessor):
    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in enumerate(self.rows):
            sampling = row.request.sampling
            if sampling.temperature <= 0 or row.finish is not None:
                continue
            row_scores = TemperatureLogitsWarper(sampling.temperature)(input_ids[i : i + 1], scores[i : i + 1].float())
            if sampling.top_p < 1:
                row_scores = TopPLogitsWarper(sampling.top_p)(input_ids[i : i + 1], row_scores)
            token = int(torch.multinomial(torch.softmax(row_scores, dim=-1).cpu(), 1, generator=row.generator))
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


class EngineBusy(Exception):
    """The queue holds `max_queued` requests already."""


class Engine:
    """Owns a StrategyModel in one worker thread; `submit` may be called from any thread."""

    def __init__(
        self,
        model: StrategyModel,
        strategy: str = ROUTED,
        max_batch_size: int = 16,
        batch_window: float = 0.01,
        max_queued: int = 256,
    ):
        self.model, self.strategy = model, strategy
        self.max_batch_size, self.batch_window = max_batch_size, batch_window
        self.on_batch: Callable[[int], None] = lambda size: (
            None
        )  # told each generate call's rows (the server's metrics)
        self.tokenizer = model.tokenizer
        self.adapters = serving_names(model, strategy)  # public id → loaded adapter
        self.public = {adapter: name for name, adapter in self.adapters.items()}
        self.experts = {served.name: served.expert for served in served_adapters(model.run, strategy)}
        self.stacked = model.bank.stacked(list(self.adapters.values()))
        self.context_length = getattr(model.model.config, "max_position_embeddings", None)
        self.vocabulary = model.model.get_input_embeddings().num_embeddings
        # a token stands for at most as many characters as its spelling in the vocabulary has (byte-level BPE spells each
        # byte as one character), so a text of C characters has at least C / longest_token tokens
        self.longest_token = max(len(token) for token in self.tokenizer.get_vocab())
        self.stats: Counter = Counter()
        self._queue: queue.Queue[Request | None] = queue.Queue(maxsize=max_queued)
        self._worker = threading.Thread(target=self._loop, name="gradientspace-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ prompts

    def chat_prompt(self, messages: list[dict[str, str]]) -> tuple[Record, list[int]]:
        """The record the router reads and the prompt ids, with the chat template the adapters were trained with."""
        record = Record("request", messages, "")
        return record, self.tokenizer(prompt_text(self.tokenizer, record), add_special_tokens=False)["input_ids"]

    def text_prompt(self, prompt: str) -> tuple[Record, list[int]]:
        """A raw completion prompt: no chat template, routed on its text."""
        return Record("request", [{"role": "user", "content": prompt}], ""), self.tokenizer(prompt)["input_ids"]

    # ------------------------------------------------------------------ requests

    def submit(self, request: Request) -> Request:
        """Queues a request that cannot break a batch: ValueError for a bad one, EngineBusy when the queue is full."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty (no tokens)")
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= self.vocabulary:
            raise ValueError(f"a prompt token id is outside the vocabulary [0, {self.vocabulary})")
        if request.sampling.max_tokens < 1:
            raise ValueError(f"max_tokens is {request.sampling.max_tokens}; it must be at least 1")
        if request.pinned is not None and request.pinned not in self.adapters:
            raise ValueError(f"model {request.pinned!r} is not served here ({', '.join(self.adapters)})")
        request.generator = request.sampling.generator()
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise EngineBusy(f"{self._queue.maxsize} requests are already waiting") from None
        return request

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def complete(self, record: Record, sampling: Sampling, pinned: str | None = None) -> tuple[Request, str, Route]:
        """Blocking: one chat request through the same queue and batches as the server's; (request, text, route)."""
        events: queue.Queue = queue.Queue()
        _, prompt_ids = self.chat_prompt(record.messages)
        request = self.submit(
            Request(record, prompt_ids, sampling, lambda kind, value: events.put((kind, value)), pinned)
        )
        text, route = [], None
        while True:
            kind, value = events.get()
            if kind == "route":
                route = value
            elif kind == "text":
                text.append(value)
            elif kind == "error":
                raise RuntimeError(value)
            else:
                return request, "".join(text), route

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the worker

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, closing = [first], False
            # counted from the first request's arrival: requests that queued behind a running batch start at once
            deadline = first.submitted + self.batch_window
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(deadline - time.perf_counter(), 0.0))
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                batch.append(item)
            live = [r for r in batch if not r.cancelled.is_set()]
            for request in batch:
                if request.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    with contextlib.suppress(Exception):  # its client is gone: a failing consumer changes nothing
                        request.emit("done", "cancelled")
            if live:
                self._decode_isolating(self._route_isolating(live))
            if closing:
                return

    def _route_isolating(self, batch: list[Request]) -> list[_Row]:
        """Rows of the requests routed in one router pass; if that fails, each request alone, and only those that fail alone get an error."""
        try:
            routes = self._route(batch)
        except Exception as err:
            if len(batch) == 1:
                self.stats["failed_requests"] += 1
                _tell_error(batch[0], err)
                return []
            self.stats["split_batches"] += 1
            return [row for request in batch for row in self._route_isolating([request])]
        rows = []
        for request, (adapter, route) in zip(batch, routes):
            try:
                request.emit("route", route)
            except Exception as err:  # its own consumer failed: only it is dropped
                self.stats["failed_requests"] += 1
                _tell_error(request, err)
                continue
            rows.append(_Row(request, adapter, self.tokenizer, self.model.eos_ids))
        return rows

    def _route(self, batch: list[Request]) -> list[tuple[str, Route]]:
        """(adapter, Route) of each request: pinned, or chosen by the router in one pass."""
        routes: list[tuple[str, Route] | None] = [
            (self.adapters[r.pinned], Route(r.pinned, self.experts[r.pinned], 1.0)) if r.pinned else None for r in batch
        ]
        unpinned = [i for i, r in enumerate(batch) if not r.pinned]
        if unpinned:
            choices, seconds = self.model.choose(self.strategy, [batch[i].record for i in unpinned])
            for i, choice in zip(unpinned, choices):
                if choice.single_adapter is None:
                    raise ValueError(f"strategy `{self.strategy}` mixes adapters per prompt; it cannot be served")
                batch[i].routing_seconds = seconds
                routes[i] = (
                    choice.single_adapter,
                    Route(
                        self.public.get(choice.single_adapter, choice.single_adapter),
                        choice.expert,
                        choice.probability,
                        choice.pick,
                        choice.fallback,
                    ),
                )
        return routes

    def _decode_isolating(self, rows: list[_Row]) -> None:
        """Decodes the rows together; if that fails, the unfinished ones again in halves (each resuming where it stopped), down to the one that fails alone."""
        try:
            if rows:
                self._decode(rows)
        except Exception as err:
            unfinished = [row for row in rows if row.finish is None]
            if len(rows) == 1:
                self.stats["failed_requests"] += len(unfinished)
                for row in unfinished:
                    row.fail(err)
                return
            self.stats["split_batches"] += 1
            half = (len(unfinished) + 1) // 2
            self._decode_isolating(unfinished[:half])
            self._decode_isolating(unfinished[half:])

    @torch.no_grad()
    def _decode(self, rows: list[_Row]) -> None:
        for row in rows:
            if row.tokens_left() <= 0:  # a retried row whose last token was already sent
                row.end_at_length()
        rows = [row for row in rows if row.finish is None]
        if not rows:
            return
        sampling = any(row.request.sampling.temperature > 0 for row in rows)
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["mixed_batches"] += int(len({row.adapter for row in rows}) > 1)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        self.on_batch(len(rows))
        self.model.bank.decode(
            [row.input_ids() for row in rows],
            [row.adapter for row in rows],
            max(row.tokens_left() for row in rows),
            stopping_criteria=StoppingCriteriaList([RowStops(rows)]),
            logits_processor=LogitsProcessorList([RowSampler(rows)] if sampling else []),
            stack=self.stacked,
        )
        for row in rows:
            if row.finish is None:  # generate ran out of steps before the row's own check
                row.end_at_length()
            self.stats["cancelled"] += row.finish == "cancelled"
