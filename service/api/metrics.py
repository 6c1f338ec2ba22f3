"""Prometheus metrics of the HTTP API: requests, latency, jobs by status, active version.

A private registry per ingress replica (so nothing global leaks between apps in one process).
Requests are labelled by route template (`/v1/tasks/{task_id}`), never by raw path, to keep the
label set small. With several ingress replicas each serves its own counters; scrape them all or
use Ray's own metrics export for cluster-wide totals.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class HttpMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gnsp_http_requests", "HTTP requests served", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("gnsp_http_request_duration_seconds", "HTTP request latency", ["route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.jobs = Gauge("gnsp_jobs", "Jobs by status", ["status"], registry=self.registry)
        self.active = Gauge("gnsp_active_model_version", "The active model version", registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self, job_counts: dict[str, int], active_version: int | None) -> tuple[bytes, str]:
        for status, count in job_counts.items():
            self.jobs.labels(status).set(count)
        self.active.set(active_version or 0)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


METRICS = HttpMetrics()


class MetricsMiddleware:
    """Pure ASGI (no body buffering, so streamed uploads stay streamed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            METRICS.observe(scope.get("method", ""), route, status, time.perf_counter() - started)
