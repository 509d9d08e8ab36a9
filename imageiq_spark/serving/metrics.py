"""`/metrics`: the server's Prometheus metrics, and the middleware that counts and times every
HTTP request by its route.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.routing import Match

from imageiq_spark.serving.model import ServedModel

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("imageiq_serve_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("imageiq_serve_request_duration_seconds",
                                 "Time from request to response, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("imageiq_serve_images", "Images recognised, by outcome",
                              ["outcome"], registry=self.registry)
        self.batch_size = Histogram("imageiq_serve_batch_size", "Images per forward pass",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.model = Gauge("imageiq_serve_model_info", "1 for the model version being served",
                           ["model_name", "model_version"], registry=self.registry)
        self.ready = Gauge("imageiq_serve_ready", "1 once the model is loaded and warmed",
                           registry=self.registry)
        self.switches = Counter("imageiq_serve_model_switches", "Switches to a new model version",
                                registry=self.registry)

    def serving(self, old: ServedModel | None, new: ServedModel) -> None:
        if old is not None:
            self.model.remove(old.name, old.version)
            self.switches.inc()
        self.model.labels(new.name, new.version).set(1)
        self.ready.set(1)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not the raw path), those the
    Guard refused before routing included."""

    def __init__(self, app: Any, metrics: Metrics, routes: list[Any]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def route_of(self, scope: dict[str, Any]) -> str:
        route = scope.get("route") or next(
            (r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", "unmatched")

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            name = self.route_of(scope)
            self.metrics.requests.labels(name, scope["method"], str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)
