"""What stands in front of the endpoints of `serve` and `route`: the listening socket, the API key, the body-size limit.

The socket is bound before the model loads, so a port in use or a host this machine does not
have is a one-line error at once, not after a minute of loading; uvicorn then serves on that
very socket (no second bind, no race). The API key and the body limit are plain ASGI
middleware: each answers in OpenAI's error shape before FastAPI parses anything, and neither
wraps a streamed response (a disconnect still reaches the endpoint at once).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket

from gradientspace.config import ConfigError

from .protocol import APIError

API_KEY_VARIABLE = "GRADIENTSPACE_API_KEY"
UPSTREAM_API_KEY_VARIABLE = "GRADIENTSPACE_UPSTREAM_API_KEY"


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening; ConfigError naming the key when that is impossible."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(
            f"config key `serve.host`: {host!r} is not an address of this machine ({err}); use 127.0.0.1, 0.0.0.0 or ::"
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart may reuse a port in TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"config key `serve.port`: {host}:{port} is already in use by another process; choose another with --port"
            ) from None
        key = "serve.port" if err.errno == errno.EACCES else "serve.host"
        raise ConfigError(f"config key `{key}`: cannot listen on {host}:{port} ({err.strerror})") from None
    return sock


def serve_on(sock: socket.socket, app, host: str, port: int) -> None:
    """Runs uvicorn on the bound socket until Ctrl-C, which is how a server is stopped (uvicorn re-raises it once shut down)."""
    import uvicorn

    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run(sockets=[sock])


def api_key(flag: str | None) -> str | None:
    """The key every /v1 request must carry: the flag, else the environment variable, else none (open)."""
    return flag or os.environ.get(API_KEY_VARIABLE) or None


def upstream_api_key(flag: str | None) -> str | None:
    """The key `route` sends its upstream (`--upstream-api-key`, else $GRADIENTSPACE_UPSTREAM_API_KEY): never its clients' own."""
    return flag or os.environ.get(UPSTREAM_API_KEY_VARIABLE) or None


class RequireAPIKey:
    """With a key set, every /v1 request must send `Authorization: Bearer KEY` (as vLLM's --api-key); /health and /metrics stay open."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(sent, self.expected):
                refusal = APIError(
                    401,
                    "Incorrect or missing API key: send the server's key as `Authorization: Bearer KEY`",
                    code="invalid_api_key",
                    headers={"www-authenticate": "Bearer"},
                )
                return await refusal.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """A body over `limit` bytes is a 413: refused on its Content-Length before a byte is read, or, sent chunked,
    once the bytes read pass the limit. The body is read here (at most `limit` bytes held) and replayed to the app."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await APIError(
                400, f"Content-Length {declared.decode(errors='replace')!r} is not a number"
            ).response()(scope, receive, send)
        if declared is not None and int(declared) > self.limit:
            return await self._too_large(int(declared))(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._too_large(None)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self, size: int | None):
        sent = f"{size} bytes" if size is not None else "more"
        return APIError(
            413,
            f"The request body is {sent}; this server accepts at most {self.limit} bytes (serve.max_body_bytes)",
            code="request_too_large",
        ).response()
