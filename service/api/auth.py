"""Bearer-token authentication of the REST API's write routes (and, by a setting, of /metrics).

The routes live on a FastAPI app that Ray Serve copies into each ingress replica, so the settings
cannot ride on the app object the module builds: `Ingress.__init__` hands them to `use_settings`,
which keeps them in this module of the replica's own process, where the dependencies read them.
The OpenAPI document states the bearer scheme only where a token is actually required.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import UnauthorizedError
from service.settings import ServiceSettings

bearer = HTTPBearer(auto_error=False, description="The service's API token (GNSP_API_TOKEN).")
SCHEME = "HTTPBearer"  # FastAPI names the security scheme after the HTTPBearer class

_settings: ServiceSettings | None = None


def use_settings(settings: ServiceSettings) -> None:
    """Make `settings` the ones this process's routes check tokens against."""
    global _settings
    _settings = settings


def _token() -> str | None:
    return _settings.token() if _settings is not None else None


def _check(credentials: HTTPAuthorizationCredentials | None) -> None:
    token = _token()
    if token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise UnauthorizedError("this endpoint needs the header 'Authorization: Bearer <token>' with the service's "
                                "API token (the GNSP_API_TOKEN it was started with)")


async def require_token(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    """Router-level dependency of every write route: the bearer token, when the service has one."""
    _check(credentials)


async def require_metrics_token(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    """/metrics needs the token only with the `metrics_need_token` setting (scrapers often cannot send one)."""
    if _settings is not None and _settings.metrics_need_token:
        _check(credentials)


def metrics_guarded() -> bool:
    return _token() is not None and _settings is not None and _settings.metrics_need_token


def document_security(schema: dict[str, Any], metrics_path: str = "/metrics") -> dict[str, Any]:
    """The OpenAPI document with the bearer scheme on exactly the operations that need a token now:
    none without a token; the write routes (and /metrics if it is guarded) with one."""
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            if "security" in operation and (_token() is None or (path == metrics_path and not metrics_guarded())):
                del operation["security"]
            responses = operation.setdefault("responses", {})
            if "security" in operation:
                responses.setdefault("401", {"description": "Missing or wrong bearer token"})
            else:
                responses.pop("401", None)
    if _token() is None:
        schemes = schema.get("components", {}).get("securitySchemes", {})
        schemes.pop(SCHEME, None)
        if not schemes:
            schema.get("components", {}).pop("securitySchemes", None)
    return schema
