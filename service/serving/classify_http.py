"""The HTTP face of the classifier replicas: POST /v1/classify served in the process that holds the model.

The classifier deployment is the ingress of its own Serve application, routed at /v1/classify,
so a classify request crosses one hop (Serve's proxy to a classifier replica) instead of two
(proxy, API ingress, classifier). The API application keeps the other routes and the OpenAPI
document. Errors, metrics and the Server-Timing header are those of the API's app.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from service.api.http_errors import install_error_handlers
from service.errors import NotReadyError
from service.api.metrics import MetricsMiddleware

CLASSIFY_ROUTE = "/v1/classify"
CLASSIFIER_DEPLOYMENT = "Classifier"
Scope = dict[str, Any]


def classify_app_name(api_app: str) -> str:
    """The Serve application of the classifier replicas that belongs to the API application `api_app`."""
    return f"{api_app}-classify"


def classifier_handle() -> DeploymentHandle:
    """The classifier of the application beside this replica's own (called inside a replica of the API)."""
    app = classify_app_name(serve.get_replica_context().app_name)
    try:
        return serve.get_deployment_handle(CLASSIFIER_DEPLOYMENT, app)
    except Exception as exc:  # Serve says "not found" with several exception types across versions
        raise NotReadyError(f"the classifier application {app!r} is not running; deploy it beside the API "
                            "(service.api.app:build_classify_app at /v1/classify, as deploy/serve_config.yaml "
                            "does)") from exc


class FullPathRouting:
    """Route on the full request path: Serve sets the ASGI root_path to the application's route
    prefix, which would leave /v1/classify matching only a route at '' (Starlette redirects that)."""

    def __init__(self, app: Callable[[Scope, Callable, Callable], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("root_path", "").endswith(CLASSIFY_ROUTE):
            scope = {**scope, "root_path": scope["root_path"][:-len(CLASSIFY_ROUTE)]}
        await self.app(scope, receive, send)


def classify_app() -> FastAPI:
    app = FastAPI(title="gnsp classify", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(FullPathRouting)
    return app


def server_timing(timing: dict[str, float], handler_ms: float) -> str:
    """A W3C Server-Timing value: the time a classify request spent in its HTTP handler (body read
    and checked), in the classifier (decode, queue, batch), in its batch's forward (waiting for the
    forward thread, then its image-tower passes: `pass`), which browsers' dev tools and
    benchmarks/serve_load.py read to split latency by hop."""
    return (f"ingress;dur={handler_ms:.2f}, classifier;dur={timing['classifier']:.2f}, "
            f"forward;dur={timing['forward']:.2f}, pass;dur={timing['pass']:.2f}, batch;desc={timing['batch']}")


def parse_server_timing(header: str) -> dict[str, float]:
    """The values `server_timing` wrote, as {"ingress": ms, "classifier": ms, "forward": ms, "batch": n}."""
    values = {}
    for entry in header.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            values[name] = float(param.split("=", 1)[1].strip('"'))
    return values
