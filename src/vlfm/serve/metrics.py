"""Prometheus metrics of one server (its own registry, so several apps in one process never share counts)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
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

    def middleware(self, app):
        """Pure ASGI (no per-request Request objects; streaming untouched): counts each response by its route's
        template (never the raw path), its status and, for errors, the `x-vlfm-error` type."""

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            start, seen = time.perf_counter(), {"status": 500, "error": None}

            async def send_counted(message):
                if message["type"] == "http.response.start":
                    seen["status"] = message["status"]
                    seen["error"] = dict(message.get("headers", [])).get(b"x-vlfm-error")
                await send(message)

            try:
                await app(scope, receive, send_counted)
            finally:
                route = getattr(scope.get("route"), "path", "unmatched")
                self.requests.labels(route, scope["method"], str(seen["status"])).inc()
                self.latency.labels(route).observe(time.perf_counter() - start)
                if seen["error"]:
                    self.errors.labels(route, seen["error"].decode()).inc()

        return counted

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
