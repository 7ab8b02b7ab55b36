"""`gradientspace serve RUN`: an OpenAI-compatible server of routed experts on one base model.

`GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, streamed
as server-sent events ending in `data: [DONE]` or not. `model: "gradientspace"` routes the prompt;
an expert's id (`expert-2`, `generalist`) pins it. The adapter that answered is the response's
`model`, the `x-gradientspace-expert` / `x-gradientspace-probability` headers (sent before the
first streamed byte) and the body's `gradientspace` field. A client that disconnects cancels its
generation; its batch goes on without it.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..config import RunConfig
from ..inference import ServedAdapter
from .engine import Engine, Request, Route, Sampling
from .protocol import (APIError, ChatRequest, CompletionRequest, completion_id, install_error_handlers, model_list,
                       resolve_model, route_headers)

DISCONNECT_POLL_SECONDS = 0.25


class _Pending:
    """A submitted request as the event loop sees it: the worker's events arrive on an asyncio queue."""

    def __init__(self, engine: Engine, request_args: dict):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.request = engine.submit(Request(**request_args, emit=self.emit))

    def emit(self, kind: str, value: object) -> None:
        """Called by the engine's worker thread."""
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


def create_app(engine: Engine, served: list[ServedAdapter], base: str, default_max_tokens: int) -> FastAPI:
    app = FastAPI(title="GradientSpace", description="Routed LoRA experts behind an OpenAI-compatible API")
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": dict(engine.stats)}

    @app.get("/v1/models")
    async def models():
        return model_list(served, base)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        body.unsupported()
        record, prompt_ids = engine.chat_prompt(body.turns())
        return await respond(body, record, prompt_ids, http, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        body.unsupported()
        record, prompt_ids = engine.text_prompt(body.text())
        return await respond(body, record, prompt_ids, http, chat=False)

    def budget(prompt_tokens: int, requested: int | None, param: str) -> int:
        limit = engine.context_length
        if limit is None:
            return requested or default_max_tokens
        if prompt_tokens >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt alone has {prompt_tokens} tokens",
                           param=param, code="context_length_exceeded")
        if requested and prompt_tokens + requested > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; you requested {prompt_tokens + requested} "
                                f"({prompt_tokens} in the prompt, {requested} for the completion)", param="max_tokens", code="context_length_exceeded")
        return min(requested or default_max_tokens, limit - prompt_tokens)

    async def respond(body: ChatRequest | CompletionRequest, record, prompt_ids: list[int], http: HTTPRequest, chat: bool):
        pinned = resolve_model(body.model, served)
        sampling = Sampling(budget(len(prompt_ids), body.token_budget(), "messages" if chat else "prompt"), body.temperature, body.top_p, body.stops(), body.seed)
        pending = _Pending(engine, {"record": record, "prompt_ids": prompt_ids, "sampling": sampling, "pinned": pinned})
        kind, route = await pending.next(http)
        if kind == "error":
            raise APIError(500, str(route), type="server_error")
        if kind == "done":  # the client left before its request was routed
            return None
        shape = _Shape(chat, completion_id(chat), route)
        headers = route_headers(route.model, route.probability)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(pending, http, shape, len(prompt_ids), usage), media_type="text/event-stream", headers=headers)
        text = []
        while True:
            kind, value = await pending.next(http)
            if kind == "text":
                text.append(value)
            elif kind == "error":
                raise APIError(500, str(value), type="server_error")
            else:
                break
        return JSONResponse(shape.whole("".join(text), value, _usage(len(prompt_ids), pending.request)), headers=headers)

    async def stream(pending: _Pending, http: HTTPRequest, shape: "_Shape", prompt_tokens: int, usage: bool):
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
        return {"id": self.id, "object": object, "created": self.created, "model": self.route.model,
                "gradientspace": {"expert": self.route.model, "router_expert": self.route.expert, "probability": round(self.route.probability, 4)}}

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._envelope("chat.completion" if self.chat else "text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, text: str, finish: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._envelope("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}


def _usage(prompt_tokens: int, request: Request) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": request.completion_tokens, "total_tokens": prompt_tokens + request.completion_tokens}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def build(config: RunConfig, strategy: str = "routed") -> tuple[FastAPI, Engine]:
    """The app and its engine for a run: the base model with every served adapter, and the router."""
    from ..inference import StrategyModel, served_adapters

    model = StrategyModel(config, [strategy])
    engine = Engine(model, strategy, config.serve.max_batch_size, config.serve.batch_window_ms / 1000)
    return create_app(engine, served_adapters(model.run, strategy), config.model.name, config.serve.default_max_tokens), engine


def serve(config: RunConfig) -> None:
    """`gradientspace serve RUN`: blocks until interrupted."""
    import uvicorn

    app, engine = build(config)
    print(f"gradientspace: {config.model.name} with {', '.join(engine.adapters)} (model `gradientspace` routes) "
          f"on http://{config.serve.host}:{config.serve.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=config.serve.host, port=config.serve.port, log_level="info")
    finally:
        engine.close()
