"""The error answers of every FastAPI app of the service: `{"error": {"code", "message"}}` for any failure.

Both HTTP entry points (the API's ingress and the classifier replicas that serve /v1/classify
themselves) install the same handlers, so an error reads the same whichever process answered it.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from gnsp_core.errors import GnspError

from service.errors import BusyError, UnauthorizedError, error_body, error_message, http_status, unwrap

log = logging.getLogger(__name__)
HTTP_METHODS = {"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"}
RETRY_AFTER_S = 1
"""What a 429 tells the client to wait: bounded queues drain within about a second."""


async def gnsp_error(request: Request, exc: GnspError) -> JSONResponse:
    exc = unwrap(exc)
    headers = None
    if isinstance(exc, UnauthorizedError):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, BusyError):
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(error_body(exc.code, error_message(exc)), status_code=http_status(exc), headers=headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return JSONResponse(error_body("invalid_request", problems or "invalid request"), status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):
        message = f"{message}: {request.method} {request.url.path}; the API is described at /docs"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request, headers.get("Allow", ""))
    return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=headers or None)


def allowed_methods(request: Request, fallback: str) -> str:
    """Every method the OpenAPI document gives the request's path (HEAD with GET, as Starlette
    serves it). Starlette's own 405 names only the first route that matched the path, and a path
    served by two routes (GET and DELETE /v1/tasks/{task_id}) has both."""
    path = request.scope.get("path", "")
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].match(path):
            methods = {method.upper() for method in operations} & HTTP_METHODS
            return ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))
    return fallback  # a route outside the document (/docs, /openapi.json)


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    cause = unwrap(exc)
    if isinstance(cause, GnspError):
        return await gnsp_error(request, cause)
    log.error("%s %s failed", request.method, request.url.path, exc_info=cause)
    return JSONResponse(error_body("internal_error", f"internal error ({type(cause).__name__}); see the service log"),
                        status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GnspError, gnsp_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
