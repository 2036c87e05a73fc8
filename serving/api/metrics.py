"""Prometheus metrics of the API: requests, latency, errors and micro-batch sizes.

Each app gets its own ``CollectorRegistry`` (tests and benchmarks build many apps in one process, and
the global registry refuses a metric name twice). The middleware is plain ASGI rather than Starlette's
``BaseHTTPMiddleware``, which would add a task and a memory stream to every request. Requests are
labelled by route template (``/v1/items/{item_id}/thumbnail``), not by raw path, so a scan of random
URLs cannot grow the label set without bound.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["REQUEST_START_KEY", "ApiMetrics", "MetricsMiddleware", "metrics_router"]

#: Key in the ASGI scope under which the middleware stores the request's arrival (``time.perf_counter``).
REQUEST_START_KEY = "retrieval.request_start"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ApiMetrics:
    """The metrics of one app, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "retrieval_http_requests",
            "HTTP requests answered, by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "retrieval_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "retrieval_http_errors",
            "Requests answered with a 4xx or 5xx status (5xx includes unhandled exceptions)",
            ["route", "status"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "retrieval_query_batch_size",
            "Query images embedded together in one encoder call by the micro-batcher",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(status)).inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def _route_label(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return str(route.path)
    mounted = scope.get("root_path") or ""  # a Mount (static files) extends the root path by its prefix
    return f"{mounted}/*" if mounted else "unmatched"


class MetricsMiddleware:
    """Count and time every HTTP request into ``metrics``; store its arrival time in the scope."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope[REQUEST_START_KEY] = start
        status = 500

        async def recording_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except BaseException:
            status = 500
            raise
        finally:
            self.metrics.observe(_route_label(scope), scope["method"], status, time.perf_counter() - start)


def metrics_router(dependencies: list) -> APIRouter:
    """``GET /metrics``: the app's metrics in the Prometheus text format."""
    router = APIRouter(dependencies=dependencies, tags=["operations"])

    @router.get(
        "/metrics",
        response_class=Response,
        summary="Prometheus metrics",
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "metrics in the text format"}},
    )
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router
