"""`GET /metrics`: the server's Prometheus metrics, in the text format vLLM and LoRAX users already scrape.

Each app has a registry of its own (not prometheus_client's global one), so two servers in one
process — the tests, a bench — never share counts. The engine's worker thread observes batch
sizes and finished requests directly: prometheus_client's metrics are thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import Request, Route

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


ENDPOINTS = {
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
}  # of `serve` and `route` alike
PROBABILITY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServerMetrics:
    """`serve`'s and `route`'s metrics, one registry per app; `route` has no queue of its own (`queue_depth` None)."""

    def __init__(self, queue_depth: Callable[[], int] | None, endpoints: set[str]):
        self.registry = CollectorRegistry()
        self.endpoints = (
            endpoints  # other paths are counted as "other", so a scan of random URLs cannot grow the label set
        )
        registry = self.registry
        self.requests = Counter(
            "gradientspace_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=registry,
        )
        self.by_expert = Counter(
            "gradientspace_expert_requests",
            "Generation requests by the adapter that answered them",
            ["expert"],
            registry=registry,
        )
        self.router_picks = Counter(
            "gradientspace_router_picks",
            "Routed requests by the router's top group, before its threshold",
            ["group"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "gradientspace_fallback_requests",
            "Routed requests the fall-back adapter answered, by why: the router "
            "was below its threshold, or the group's expert is not served",
            ["reason"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "gradientspace_prompt_tokens",
            "Prompt tokens of the generation requests that reached the engine",
            registry=registry,
        )
        self.generation_tokens = Counter("gradientspace_generation_tokens", "Tokens generated", registry=registry)
        self.failed = Counter(
            "gradientspace_engine_failed_requests", "Requests the engine answered with an error", registry=registry
        )
        self.router_probability = Histogram(
            "gradientspace_router_top_probability",
            "The router's top probability per routed request",
            buckets=PROBABILITY_BUCKETS,
            registry=registry,
        )
        if queue_depth is not None:
            Gauge("gradientspace_queue_depth", "Requests waiting for a batch", registry=registry).set_function(
                queue_depth
            )
        self.batch_size = Histogram(
            "gradientspace_batch_size", "Rows per generate call", buckets=BATCH_BUCKETS, registry=registry
        )
        self.time_to_first_token = Histogram(
            "gradientspace_time_to_first_token_seconds",
            "From queued to first token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "gradientspace_request_latency_seconds",
            "From queued to the last token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, request: Request, kind: str, value: object) -> None:
        """One engine event of `request` (called by the worker thread)."""
        if kind == "route":
            self.routed(value)
            self.prompt_tokens.inc(len(request.prompt_ids))
        elif kind == "error":
            self.failed.inc()
        elif kind == "done":
            self.generation_tokens.inc(request.completion_tokens)
            if value != "cancelled" and request.first_token is not None:
                self.time_to_first_token.observe(request.first_token - request.submitted)
                self.latency.observe((request.finished or time.perf_counter()) - request.submitted)

    def routed(self, route: Route) -> None:
        """Which adapter answered one request, and for a routed one the router's pick, top probability and any fall-back."""
        self.by_expert.labels(route.model).inc()
        if route.pick is not None:
            self.router_picks.labels(str(route.pick)).inc()
            self.router_probability.observe(route.probability)
        if route.fallback is not None:
            self.fallbacks.labels(route.fallback).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountStatuses:
    """ASGI middleware: counts every response by endpoint and status, refusals by the other middleware and crashes (500) included."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.metrics.endpoints else "other"
        status = None

        async def noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        except Exception:
            status = status or 500  # answered by Starlette's error handler, outside this middleware
            raise
        finally:  # no status at all: the client went away before any answer
            self.metrics.requests.labels(endpoint, str(status or "closed")).inc()
