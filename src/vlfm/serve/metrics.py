"""Prometheus metrics of one server (its own registry, so several apps in one process never share counts)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("vlfm_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)  # fmt: skip
        self.errors = Counter("vlfm_errors", "error responses by route and error type", ["route", "type"],
                              registry=self.registry)  # fmt: skip
        self.latency = Histogram("vlfm_request_seconds", "request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.batch = Histogram("vlfm_batch_size", "items per encoder forward pass", ["kind"],
                               buckets=BATCH_BUCKETS, registry=self.registry)  # fmt: skip

    def observe_batch(self, kind: str, size: int) -> None:
        self.batch.labels(kind).observe(size)

    async def middleware(self, request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")  # a template, never the raw path
        self.requests.labels(route, request.method, str(response.status_code)).inc()
        self.latency.labels(route).observe(time.perf_counter() - start)
        error = response.headers.get("x-vlfm-error")
        if error:
            self.errors.labels(route, error).inc()
        return response

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
