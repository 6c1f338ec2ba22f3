"""Prometheus metrics of the HTTP API: requests and latency by route, jobs by status, the active version.

Requests and latencies are Ray metrics (`ray.util.metrics`): every replica of both applications
(the API's ingress replicas and the classifier replicas that answer /v1/classify) records into
its node's Ray metrics agent, which exports them with Ray's own metrics as
`ray_gnsp_http_requests_total{method,route,status,application}` and
`ray_gnsp_http_request_duration_seconds_*{route,application}`. Prometheus scraping Ray's metrics
endpoints (one per node, as Ray documents) sums them, so the counts are right with any number of
replicas; a registry per replica would give each scrape one replica's share. Routes are the
route templates (`/v1/tasks/{task_id}`), never raw paths, to keep the label set small.

`/metrics` serves the service-wide gauges, read from the job runner and the store at each scrape
(the same whichever replica answers): jobs by status and the active version.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class RequestMetrics:
    """Request counts and latencies in Ray's metrics (created on first use, in a Ray worker)."""

    def __init__(self) -> None:
        self._metrics: tuple[Any, Any] | None = None
        self.application = ""

    def _created(self) -> tuple[Any, Any] | None:
        if self._metrics is None:
            import ray

            if not ray.is_initialized():
                return None  # outside Ray (a bare app in a unit test): nothing to export to
            from ray.util.metrics import Counter, Histogram

            self.application = _application()
            self._metrics = (
                Counter("gnsp_http_requests", "HTTP requests served",
                        tag_keys=("method", "route", "status", "application")),
                Histogram("gnsp_http_request_duration_seconds", "HTTP request latency", boundaries=LATENCY_BUCKETS,
                          tag_keys=("route", "application")))
        return self._metrics

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        metrics = self._created()
        if metrics is None:
            return
        requests, latency = metrics
        requests.inc(1, tags={"method": method, "route": route, "status": str(status), "application": self.application})
        latency.observe(seconds, tags={"route": route, "application": self.application})


def _application() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().app_name
    except Exception:  # not in a Serve replica
        return ""


def render_gauges(job_counts: dict[str, int], active_version: int | None) -> tuple[bytes, str]:
    """The /metrics body: jobs by status and the active version, as read now."""
    registry = CollectorRegistry()
    jobs = Gauge("gnsp_jobs", "Jobs by status", ["status"], registry=registry)
    for status, count in job_counts.items():
        jobs.labels(status).set(count)
    Gauge("gnsp_active_model_version", "The active model version", registry=registry).set(active_version or 0)
    return generate_latest(registry), CONTENT_TYPE_LATEST


METRICS = RequestMetrics()


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
