"""Service errors, and the one place that turns any GnspError into an HTTP status.

gnsp_core raises one exception type per user mistake (bad dataset, bad config, ...); the service
adds its own (unknown version, upload too large, missing token, ...). Every route lets them
propagate and `http_status` decides the status, so the mapping cannot drift between routes.
Errors raised inside another deployment arrive wrapped in a RayTaskError: `unwrap` recovers them.

What a user reads (an HTTP error, a job record's `error`) never shows the server's own folders
(scratch, store, temp, the installation): `error_message` replaces such a path with its last part,
and an error that is not the user's is reported as a short reason while the service log keeps the
detail (`user_reason`).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path, PurePosixPath

from gnsp_core.errors import ArchiveTypeError, ConfigError, DatasetError, GnspError, ModelSpecError, StateError


class BadRequestError(GnspError):
    """The request is malformed (bad base64, bad labels, bad form fields)."""

    code = "bad_request"


class InvalidImageError(BadRequestError):
    """An image to classify is not a decodable PNG/JPEG within the limits."""

    code = "bad_image"


class UnsupportedMediaError(BadRequestError):
    """The request body has a content type this endpoint does not accept."""

    code = "unsupported_media_type"


class UnauthorizedError(GnspError):
    """A write endpoint was called without the right bearer token."""

    code = "unauthorized"


class NotFoundError(GnspError):
    """Something named in the request does not exist."""

    code = "not_found"


class UnknownVersionError(NotFoundError):
    code = "unknown_version"


class UnknownTaskError(NotFoundError):
    code = "unknown_task"


class ConflictError(GnspError):
    """The request is valid but the resource is in the wrong state (e.g. cancel a finished job)."""

    code = "conflict"


class UploadTooLargeError(GnspError):
    """The upload or request body is over its size limit."""

    code = "upload_too_large"


class RequestTimeoutError(GnspError):
    """The request body arrived too slowly (a pause between chunks, or the whole body, too long)."""

    code = "request_timeout"


class BusyError(GnspError):
    """A bounded queue is full (version loads, upload slots): the request may be retried shortly."""

    code = "busy"


class ServiceFault(GnspError):
    """The service itself failed (store unreadable, model will not load): a 5xx, not the user's fault."""

    code = "service_error"


class VersionLoadError(ServiceFault):
    """A stored version failed to load or to answer a check request, so it is not served."""

    code = "version_load_failed"


class NotReadyError(ServiceFault):
    """The store has no active version yet (the service is still starting)."""

    code = "not_ready"


_STATUS: dict[type[GnspError], int] = {
    UnauthorizedError: 401,
    NotFoundError: 404,
    ConflictError: 409,
    UploadTooLargeError: 413,
    BusyError: 429,
    RequestTimeoutError: 408,
    UnsupportedMediaError: 415,
    ArchiveTypeError: 415,
    BadRequestError: 400,
    DatasetError: 400,
    ConfigError: 400,
    ModelSpecError: 400,
    NotReadyError: 503,
    ServiceFault: 500,
    StateError: 500,  # a stored state that does not load is the store's fault, not the caller's
}


def http_status(error: GnspError) -> int:
    """The HTTP status for an error: the entry of its nearest class in the MRO (400 by default)."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 400


def unwrap(error: BaseException) -> BaseException:
    """The original exception behind a RayTaskError / DeploymentHandle failure, if there is one."""
    seen = 0
    while seen < 5 and getattr(error, "cause", None) is not None and error is not error.cause:
        error = error.cause
        seen += 1
    return error


_private_dirs: set[str] = {tempfile.gettempdir(), str(Path.home()), sys.prefix}


def hide_dirs(*folders: str | None) -> None:
    """Add server folders (the store, the upload scratch) that user-facing messages must not show."""
    for folder in folders:
        if folder and "://" not in folder and len(folder.rstrip("/")) > 1:
            _private_dirs.add(folder.rstrip("/"))


def redact_paths(message: str) -> str:
    """`message` with every path under a server folder shortened to `…/<last part>`."""
    for root in sorted(_private_dirs, key=len, reverse=True):
        if len(root) > 1:
            pattern = re.escape(root) + r"(?:/[^\s'\"(),;]*)?(?![\w.-])"
            message = re.sub(pattern, lambda m: f"…/{PurePosixPath(m.group(0)).name}", message)
    return message


def error_message(error: BaseException) -> str:
    """The user-facing message: the exception's own text without server paths, never a remote traceback."""
    error = unwrap(error)
    return redact_paths(str(error.args[0])) if error.args else type(error).__name__


def user_reason(error: BaseException) -> str:
    """A failed job's `error` for its user: their mistake in words, or a short note that the service
    failed (the caller logs the detail)."""
    cause = unwrap(error)
    if isinstance(cause, GnspError):
        return error_message(cause)
    return f"internal error ({type(cause).__name__}); see the service log"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
