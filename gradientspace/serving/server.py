"""`gradientspace serve RUN`: an OpenAI-compatible server of routed experts on one base model.

`GET /health`, `GET /metrics` (Prometheus), `GET /v1/models`, `POST /v1/chat/completions`,
`POST /v1/completions`, streamed as server-sent events ending in `data: [DONE]` or not.
`model: "gradientspace"` routes the prompt; an expert's id (`expert-2`, or the fall-back's: `generalist` or
`single-continued`, which `/health` names) pins it. The adapter that answered is the response's
`model`, the `x-gradientspace-expert` / `x-gradientspace-probability` headers (sent before the
first streamed byte) and the body's `gradientspace` field. A client that disconnects cancels its
generation; its batch goes on without it.

A request is checked whole before it is queued — its fields (`protocol.py`), its model, its
prompt length against `serve.max_prompt_tokens` and the context (first by characters, so that a
prompt surely too long is never tokenised, then by tokens), then whatever could break a batch
(`Engine.submit`) — so a bad one is a 4xx of its own and never reaches a batch. Prompts
are tokenised in the thread pool, never on the event loop (a megabyte prompt does not stall
`/health`). The queue is bounded (`serve.max_queued`): beyond it, a 503 with Retry-After. In
front of every route: the body-size limit (413), the API key on /v1 when one is set
(`--api-key` or GRADIENTSPACE_API_KEY), and the status counter of `/metrics`.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gradientspace.config import RunConfig, ServeConfig
from gradientspace.experts.strategies import ROUTED
from gradientspace.routing.model import ServedAdapter
from gradientspace.runner import Run

from .engine import Engine, EngineBusy, Request, Route, Sampling
from .guards import BodyLimit, RequireAPIKey, api_key, listen, serve_on
from .metrics import ENDPOINTS, CountStatuses, ServerMetrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    completion_id,
    install_error_handlers,
    model_list,
    resolve_model,
    route_headers,
)

DISCONNECT_POLL_SECONDS = 0.25
RETRY_AFTER_SECONDS = 1


class _Pending:
    """A submitted request as the event loop sees it: the worker's events arrive on an asyncio queue."""

    def __init__(
        self,
        engine: Engine,
        metrics: ServerMetrics,
        record,
        prompt_ids: list[int],
        sampling: Sampling,
        pinned: str | None,
    ):
        self.loop, self.metrics = asyncio.get_running_loop(), metrics
        self.events: asyncio.Queue = asyncio.Queue()
        self.request = Request(record, prompt_ids, sampling, self.emit, pinned)
        try:
            engine.submit(self.request)
        except ValueError as err:
            raise APIError(400, str(err)) from None
        except EngineBusy as err:
            raise APIError(
                503,
                f"The server is overloaded ({err}); retry after {RETRY_AFTER_SECONDS} s",
                type="server_error",
                code="server_overloaded",
                headers={"retry-after": str(RETRY_AFTER_SECONDS)},
            ) from None

    def emit(self, kind: str, value: object) -> None:
        """Called by the engine's worker thread."""
        self.metrics.observe(self.request, kind, value)
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (the server is shutting down): nobody is listening
            self.request.cancel()

    async def next(self, http: HTTPRequest) -> tuple[str, object]:
        """The next event; cancels the generation if the client has gone meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    self.request.cancel()
                    return "done", "cancelled"


def create_app(
    engine: Engine, served: list[ServedAdapter], base: str, settings: ServeConfig, api_key: str | None = None
) -> FastAPI:
    """The app in front of `engine`; with `api_key`, every /v1 route requires it."""
    hidden = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="GradientSpace", description="Routed LoRA experts behind an OpenAI-compatible API", **hidden)
    install_error_handlers(app)
    metrics = ServerMetrics(engine.queue_depth, ENDPOINTS)
    fallback = next(s.name for s in served if s.is_fallback)  # the public id answering what no served expert does
    engine.on_batch = metrics.batch_size.observe
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)  # added last = runs first: count, then key, then size
    if api_key:
        app.add_middleware(RequireAPIKey, key=api_key)
    app.add_middleware(CountStatuses, metrics=metrics)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.queue_depth(), "engine": dict(engine.stats), "fallback": fallback}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return model_list(served, base)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        return await respond(body, http, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        return await respond(body, http, chat=False)

    def budget(prompt_tokens: int, requested: int | None, param: str) -> int:
        limit = engine.context_length
        if limit is not None and prompt_tokens >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens; the prompt alone has {prompt_tokens} tokens",
                param=param,
                code="context_length_exceeded",
            )
        if settings.max_prompt_tokens is not None and prompt_tokens > settings.max_prompt_tokens:
            raise APIError(
                400,
                f"The prompt has {prompt_tokens} tokens; this server accepts at most {settings.max_prompt_tokens} "
                f"(serve.max_prompt_tokens)",
                param=param,
                code="prompt_too_long",
            )
        if limit is None:
            return requested or settings.default_max_tokens
        if requested and prompt_tokens + requested > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens; you requested {prompt_tokens + requested} "
                f"({prompt_tokens} in the prompt, {requested} for the completion)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return min(requested or settings.default_max_tokens, limit - prompt_tokens)

    # the most prompt tokens any request may have, and the characters beyond which a prompt surely has more
    prompt_limit = min(
        (n for n in (settings.max_prompt_tokens, engine.context_length and engine.context_length - 1) if n),
        default=None,
    )
    prompt_characters = prompt_limit and prompt_limit * engine.longest_token

    def surely_too_long(characters: int, param: str) -> None:
        """Refuses, without tokenising it, a prompt whose length in characters alone proves it has too many tokens."""
        if prompt_characters and characters > prompt_characters:
            raise APIError(
                400,
                f"The prompt has {characters} characters, so at least {characters // engine.longest_token} tokens; this "
                f"server accepts at most {prompt_limit}",
                param=param,
                code="context_length_exceeded",
            )

    async def respond(body: ChatRequest | CompletionRequest, http: HTTPRequest, chat: bool):
        # the cheap checks first, then tokenising (in the thread pool), then the checks that need the tokens
        body.unsupported()
        pinned, stops = resolve_model(body.model, served), body.stops()
        if chat:
            turns = body.turns()
            surely_too_long(sum(len(turn["content"]) for turn in turns), "messages")
            record, prompt_ids = await run_in_threadpool(engine.chat_prompt, turns)
        else:
            surely_too_long(len(body.text()), "prompt")
            record, prompt_ids = await run_in_threadpool(engine.text_prompt, body.text())
        sampling = Sampling(
            budget(len(prompt_ids), body.token_budget(), "messages" if chat else "prompt"),
            body.temperature,
            body.top_p,
            stops,
            body.seed,
        )
        pending = _Pending(engine, metrics, record, prompt_ids, sampling, pinned)
        kind, route = await pending.next(http)
        if kind == "error":
            raise APIError(500, str(route), type="server_error")
        if kind == "done":  # the client left before its request was routed
            return None
        shape = _Shape(chat, completion_id(chat), route)
        headers = route_headers(route.model, route.probability)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                stream(pending, http, shape, len(prompt_ids), usage), media_type="text/event-stream", headers=headers
            )
        text = []
        while True:
            kind, value = await pending.next(http)
            if kind == "text":
                text.append(value)
            elif kind == "error":
                raise APIError(500, str(value), type="server_error")
            else:
                break
        return JSONResponse(
            shape.whole("".join(text), value, _usage(len(prompt_ids), pending.request)), headers=headers
        )

    async def stream(pending: _Pending, http: HTTPRequest, shape: _Shape, prompt_tokens: int, usage: bool):
        try:
            yield _sse(shape.chunk("", None, first=True))
            while True:
                kind, value = await pending.next(http)
                if kind == "text":
                    yield _sse(shape.chunk(value, None))
                elif kind == "error":
                    yield _sse(APIError(500, str(value), type="server_error").response().body.decode())
                    break
                else:
                    yield _sse(shape.chunk("", value))
                    break
            if usage:
                yield _sse({**shape.chunk("", None), "choices": [], "usage": _usage(prompt_tokens, pending.request)})
            yield "data: [DONE]\n\n"
        finally:  # also on disconnect: Starlette cancels this generator when the client goes away
            pending.request.cancel()

    return app


class _Shape:
    """OpenAI's response and chunk bodies for one request (chat or text completion)."""

    def __init__(self, chat: bool, id: str, route: Route):
        self.chat, self.id, self.route, self.created = chat, id, route, int(time.time())

    def _envelope(self, object: str) -> dict:
        return {
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.route.model,
            "gradientspace": {
                "expert": self.route.model,
                "router_expert": self.route.expert,
                "probability": round(self.route.probability, 4),
            },
        }

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {
            **self._envelope("chat.completion" if self.chat else "text_completion"),
            "choices": [choice],
            "usage": usage,
        }

    def chunk(self, text: str, finish: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._envelope("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}


def _usage(prompt_tokens: int, request: Request) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": request.completion_tokens,
        "total_tokens": prompt_tokens + request.completion_tokens,
    }


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def build(run: Run | RunConfig, strategy: str = ROUTED, api_key: str | None = None) -> tuple[FastAPI, Engine]:
    """The app and its engine for a run: the base model with every served adapter, and the router."""
    from gradientspace.routing.model import StrategyModel, served_adapters

    model = StrategyModel(run, [strategy])
    config = model.config
    settings = config.serve
    engine = Engine(model, strategy, settings.max_batch_size, settings.batch_window_ms / 1000, settings.max_queued)
    return create_app(engine, served_adapters(model.run, strategy), config.model.name, settings, api_key), engine


def serve(run: Run, api_key_flag: str | None = None) -> None:
    """`gradientspace serve RUN`: binds the port, then loads the model, then blocks until interrupted."""
    config = run.config
    settings, key = config.serve, api_key(api_key_flag)
    with listen(settings.host, settings.port) as sock:
        app, engine = build(run, api_key=key)
        print(
            f"gradientspace: {config.model.name} with {', '.join(engine.adapters)} (model `gradientspace` routes) "
            f"on http://{settings.host}:{settings.port}/v1 ({'API key required' if key else 'no API key'}; metrics at /metrics)",
            flush=True,
        )
        try:
            serve_on(sock, app, settings.host, settings.port)
        finally:
            engine.close()
