"""`gradientspace route RUN --upstream URL --backend vllm|sglang`: the router in front of an inference server.

Only the router is loaded. Each request is validated as by `serve`, routed (or pinned), its
`model` rewritten to the chosen adapter as the backend names it (`backends.upstream_model`), and
forwarded with every other field untouched; the upstream's answer — status, body, stream — is
relayed byte for byte, with the routing headers added. An unreachable upstream is a 502, one that
has not begun to answer within `serve.upstream_timeout_s` a 504, both in OpenAI's error shape. At
start-up the upstream's `/v1/models` must list every served adapter, or `route` refuses to
start and names the missing ones. The upstream's own key (`--upstream-api-key`, or
$GRADIENTSPACE_UPSTREAM_API_KEY) goes with the start-up check and every forwarded request; a
client's `Authorization` (this router's key) is never forwarded. `/health` asks the upstream and
answers 503 with the reason while it cannot be reached; `/metrics` counts as `serve`'s does. The
port is bound first, the API key and the body-size limit guard it as they guard `serve`
(`guards.py`), and /docs is off unless `serve.docs` is set.
"""

from __future__ import annotations

import contextlib

import httpx
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from gradientspace.config import ServeConfig
from gradientspace.experts.strategies import BELOW_THRESHOLD, NOT_SERVED, ROUTED, ROUTER_UNSURE, get
from gradientspace.routing.model import ServedAdapter
from gradientspace.routing.router import Router, threshold_override
from gradientspace.runner import Run

from .backends import BackendError, upstream_model
from .engine import Route
from .guards import BodyLimit, RequireAPIKey, api_key, listen, serve_on, upstream_api_key
from .metrics import ENDPOINTS, CountStatuses, ServerMetrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    install_error_handlers,
    model_list,
    resolve_model,
    route_headers,
)

RELAYED_HEADERS = ("content-type", "content-encoding", "cache-control")
HEALTH_TIMEOUT_S = 5.0  # `/health` asks the upstream; a probe must not hang as long as a generation may


def upstream_root(url: str) -> str:
    """`http://host:8001`, whether the user wrote that or the OpenAI-style `http://host:8001/v1/`."""
    return url.rstrip("/").removesuffix("/v1")


def upstream_base(
    url: str, backend: str, served: list[ServedAdapter], timeout: float = 10.0, key: str | None = None
) -> str:
    """The base model the upstream serves, after checking it lists every served adapter."""
    try:
        response = httpx.get(f"{upstream_root(url)}/v1/models", timeout=timeout, headers=upstream_headers(key))
        if response.status_code == 401:
            raise BackendError(
                f"upstream {url}: GET /v1/models needs a key it was not given"
                f"{' (the one given was refused)' if key else ''}: give `--upstream-api-key` (or $GRADIENTSPACE_UPSTREAM_API_KEY)"
            )
        response.raise_for_status()
        cards = response.json()["data"]
    except BackendError:  # said already, in its own words (a ValueError, which the next line would wrap)
        raise
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
        raise BackendError(
            f"upstream {url}: GET /v1/models failed ({err}); is the {backend} server running there?"
        ) from None
    ids = [card["id"] for card in cards]
    bases = [card["id"] for card in cards if not card.get("parent")] or ids[:1]
    base = bases[0] if bases else ""
    missing = [s.name for s in served if s.name not in ids and upstream_model(backend, s.name, base) not in ids]
    if missing:
        raise BackendError(
            f"upstream {url} does not serve {', '.join(missing)} (it lists {', '.join(ids) or 'nothing'}); "
            f"start it with the command `gradientspace backend-command RUN --backend {backend}` prints"
        )
    return base


def upstream_headers(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def create_route_app(
    router: Router,
    served: list[ServedAdapter],
    base: str,
    upstream: str,
    backend: str,
    settings: ServeConfig | None = None,
    api_key: str | None = None,
    upstream_key: str | None = None,
) -> FastAPI:
    settings = settings or ServeConfig()
    client = httpx.AsyncClient(
        base_url=upstream_root(upstream),
        timeout=httpx.Timeout(settings.upstream_timeout_s, connect=10.0),
        headers=upstream_headers(upstream_key),
    )
    metrics = ServerMetrics(None, ENDPOINTS)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await client.aclose()

    hidden = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="GradientSpace router",
        description=f"Routes each request to one LoRA expert served by {backend} at {upstream}",
        lifespan=lifespan,
        **hidden,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)  # added last = runs first: count, then key, then size
    if api_key:
        app.add_middleware(RequireAPIKey, key=api_key)
    app.add_middleware(CountStatuses, metrics=metrics)
    names = {s.expert: s.name for s in served}

    @app.get("/health")
    async def health():
        state = {"upstream": upstream, "backend": backend, "fallback": names[ROUTER_UNSURE]}
        try:
            (await client.get("/v1/models", timeout=HEALTH_TIMEOUT_S)).raise_for_status()
        except httpx.HTTPError as err:
            return JSONResponse(
                {
                    "status": "unavailable",
                    **state,
                    "reason": f"upstream GET /v1/models failed: {type(err).__name__}: {err}",
                },
                status_code=503,
            )
        return {"status": "ok", **state}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return model_list(served, base)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        return await relay(body, http)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        return await relay(body, http)

    async def relay(body: ChatRequest | CompletionRequest, http: HTTPRequest):
        pinned = resolve_model(body.model, served)
        if pinned is None:
            experts, probabilities, picks = await run_in_threadpool(router.route, [body.routing_text()])
            expert = experts[0]
            fallback = BELOW_THRESHOLD if expert == ROUTER_UNSURE else NOT_SERVED if expert not in names else None
            chosen = Route(names.get(expert, names[ROUTER_UNSURE]), expert, probabilities[0], picks[0], fallback)
        else:
            chosen = Route(pinned, next(s.expert for s in served if s.name == pinned), 1.0)
        payload = await http.json()
        payload["model"] = upstream_model(backend, chosen.model, base)
        # the client's own Authorization is this router's key: only the upstream's key (the client's default header) goes on
        forwarded = {k: v for k, v in http.headers.items() if k.lower() == "accept"}
        try:
            response = await client.send(
                client.build_request("POST", http.url.path, json=payload, headers=forwarded), stream=True
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            raise APIError(
                502,
                f"upstream {upstream} is unreachable: {type(err).__name__}: {err}",
                type="server_error",
                code="upstream_unreachable",
            ) from None
        except httpx.TimeoutException:
            raise APIError(
                504,
                f"upstream {upstream} did not answer within serve.upstream_timeout_s = {settings.upstream_timeout_s:g} s",
                type="server_error",
                code="upstream_timeout",
            ) from None
        except httpx.HTTPError as err:
            raise APIError(
                502,
                f"upstream {upstream} failed: {type(err).__name__}: {err}",
                type="server_error",
                code="upstream_unreachable",
            ) from None
        metrics.routed(chosen)
        headers = {k: v for k, v in response.headers.items() if k.lower() in RELAYED_HEADERS} | route_headers(
            chosen.model, chosen.probability
        )
        return StreamingResponse(
            response.aiter_raw(),
            status_code=response.status_code,
            headers=headers,
            background=BackgroundTask(response.aclose),
        )

    return app


def route(
    run: Run,
    upstream: str,
    backend: str,
    api_key_flag: str | None = None,
    upstream_key_flag: str | None = None,
) -> None:
    """`gradientspace route RUN`: binds the port, checks the upstream, loads the router, then blocks until interrupted."""
    from gradientspace.models.loading import pick_device
    from gradientspace.routing.model import served_adapters

    config = run.config
    settings, key, upstream_key = config.serve, api_key(api_key_flag), upstream_api_key(upstream_key_flag)
    with listen(settings.host, settings.port) as sock:
        served = served_adapters(run)
        base = upstream_base(upstream, backend, served, key=upstream_key)
        router = Router.load(
            get(ROUTED).router_folder(run),
            pick_device(config.model.device),
            threshold=threshold_override(config),
        )
        print(
            f"gradientspace: routing to {', '.join(s.name for s in served)} on {backend} at {upstream} "
            f"(base {base}); listening on http://{settings.host}:{settings.port}/v1",
            flush=True,
        )
        app = create_route_app(router, served, base, upstream, backend, settings, key, upstream_key)
        serve_on(sock, app, settings.host, settings.port)
