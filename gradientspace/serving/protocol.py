"""The OpenAI-compatible surface shared by `serve` and `route`: request schemas, errors, model list, headers.

Requests are pydantic models; a body that does not validate is a 400 naming the field. Every
error — a bad body, an unknown route or method, a refused key, a crash — is one JSON shape,
`{"error": {"message", "type", "param", "code"}}`, as OpenAI's. Fields the OpenAI API (or vLLM's
extension of it) defines but a GradientSpace server does not implement are refused with a 400
naming them (`unsupported`) unless they ask for nothing, never silently ignored; other unknown
fields are ignored, as OpenAI-compatible servers do (`route` relays them upstream).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from gradientspace.routing.model import ServedAdapter

ROUTED_MODEL = "gradientspace"
EXPERT_HEADER = "x-gradientspace-expert"
PROBABILITY_HEADER = "x-gradientspace-probability"


class APIError(Exception):
    """An error a client caused or must hear about, answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status,
            message,
            type,
            param,
            code,
            headers,
        )

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
            status_code=self.status,
            headers=self.headers,
        )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


def _asks_for_nothing(value: Any, neutral: tuple) -> bool:
    """None, or one of the field's neutral values — of the same type, so `true` is not taken for `1`."""
    return value is None or any(type(value) is type(n) and value == n for n in neutral)


class Sampled(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # a 64-bit integer, as OpenAI's and torch's
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    # Fields this server does not implement, with the values that ask for nothing (clients send
    # those by default, so they pass); any other value is refused. OpenAI's, then vLLM's.
    NOT_IMPLEMENTED: ClassVar[dict[str, tuple]] = {
        "logprobs": (False,),
        "top_logprobs": (0,),
        "presence_penalty": (0, 0.0),
        "frequency_penalty": (0, 0.0),
        "logit_bias": ({},),
        "best_of": (1,),
        "top_k": (-1, 0),
        "min_p": (0, 0.0),
        "repetition_penalty": (1, 1.0),
        "min_tokens": (0,),
        "ignore_eos": (False,),
        "use_beam_search": (False,),
    }

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "`stop` takes at most 4 non-empty strings", param="stop")
        return tuple(stops)

    def unsupported(self) -> None:
        if self.n != 1:
            raise APIError(
                400,
                f"n = {self.n}: this server returns one choice per request; send n = 1 (or several requests)",
                param="n",
            )
        extra = self.model_extra or {}
        for name, neutral in self.NOT_IMPLEMENTED.items():
            if not _asks_for_nothing(extra.get(name), neutral):
                raise APIError(
                    400, f"`{name}` is not supported by this server (got {extra[name]!r}); leave it out", param=name
                )


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    NOT_IMPLEMENTED = {
        **Sampled.NOT_IMPLEMENTED,
        "tools": ([],),
        "tool_choice": ("none",),
        "functions": ([],),
        "function_call": ("none",),
        "response_format": ({"type": "text"},),
        "modalities": (["text"],),
        "audio": (),
        "prediction": (),
        "web_search_options": (),
        "reasoning_effort": (),
        "store": (False,),
    }

    def turns(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def routing_text(self) -> str:
        return "\n\n".join(m.text() for m in self.messages if m.role not in ("system", "developer"))

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampled):
    prompt: str | list[str]

    NOT_IMPLEMENTED = {**Sampled.NOT_IMPLEMENTED, "echo": (False,), "suffix": ("",)}

    def text(self) -> str:
        if not isinstance(self.prompt, str) and len(self.prompt) != 1:
            raise APIError(400, f"`prompt` holds {len(self.prompt)} prompts: send one per request", param="prompt")
        text = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        if not text:
            raise APIError(400, "`prompt` is empty", param="prompt")
        return text

    routing_text = text

    def token_budget(self) -> int | None:
        return self.max_tokens


def model_list(served: list[ServedAdapter], base: str) -> dict:
    """`GET /v1/models`: the routing alias, then every served expert and the fall-back adapter, each an adapter of `base`."""
    created = int(time.time())
    ids = [ROUTED_MODEL] + [s.name for s in served]
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "gradientspace",
                "root": base,
                "parent": base,
            }
            for name in ids
        ],
    }


def resolve_model(name: str, served: list[ServedAdapter]) -> str | None:
    """None for the routing alias (route it), else the pinned adapter's public id; 404 for anything else."""
    if name == ROUTED_MODEL:
        return None
    if any(s.name == name for s in served):
        return name
    known = ", ".join([ROUTED_MODEL] + [s.name for s in served])
    raise APIError(
        404, f"The model `{name}` does not exist. This server has: {known}", param="model", code="model_not_found"
    )


def route_headers(model: str, probability: float) -> dict[str, str]:
    return {EXPERT_HEADER: model, PROBABILITY_HEADER: f"{probability:.4f}"}


def completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def install_error_handlers(app) -> None:
    """Every error, a malformed body and a crash included, leaves as OpenAI-shaped JSON."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):  # an unknown route (404), a wrong method (405)
        kind = "server_error" if err.status_code >= 500 else "invalid_request_error"
        return APIError(
            err.status_code, f"{request.method} {request.url.path}: {err.detail}", type=kind, headers=err.headers
        ).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return APIError(400, "the body is not valid JSON").response()
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return APIError(400, f"{where or 'body'}: {first.get('msg')}", param=where or None).response()

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        return APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").response()
