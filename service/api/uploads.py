"""Untrusted input at the HTTP edge: streamed dataset uploads and images to classify.

A dataset upload is parsed as it arrives (python-multipart's streaming parser), the archive part
written straight to a local scratch file and counted, so an oversized upload is refused (413) as
soon as it crosses the limit, never buffered whole in memory; the whole body, the number of parts
and each part's headers are bounded too, and a body that pauses too long is refused (408). The
archive is then checked with gnsp_core's own safe_extract and validate_image_folder before
anything reaches the store, on the UploadGate's few threads: a bounded number of uploads at once,
none of it on the event loop that answers classify requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import binascii
import io
import json
import re
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from gnsp_core.data.archives import ArchiveLimits, safe_extract
from gnsp_core.data.folders import IMAGE_FORMATS, validate_image_folder

from service.errors import (BadRequestError, BusyError, InvalidImageError, RequestTimeoutError,
                            UnsupportedMediaError, UploadTooLargeError)
from service.api.schemas import TASK_NAME_PATTERN, ClassifyRequest
from service.api.task_config import as_validation_error, parse_task_config
from service.settings import ServiceSettings

MAX_FIELD_BYTES = 64 * 1024
"""Bytes of one text field of a dataset upload form (name, method, config, request)."""
MAX_PARTS = 16
"""Parts of a dataset upload form."""
MAX_PART_HEADERS = 8
MAX_PART_HEADER_BYTES = 4096
"""Each part of a dataset upload form may have MAX_PART_HEADERS headers of this many bytes each."""
T = TypeVar("T")


@dataclass
class ReceivedForm:
    """Text fields and at most one file, already on local disk."""

    fields: dict[str, str] = field(default_factory=dict)
    file: Path | None = None
    file_bytes: int = 0


class _FormReceiver:
    """Callbacks for MultipartParser: text fields in memory (small), the file field to disk (bounded)."""

    def __init__(self, file_field: str, target: Path, max_file_bytes: int) -> None:
        self.file_field, self.target, self.max_file_bytes = file_field, target, max_file_bytes
        self.form = ReceivedForm()
        self._header_name, self._header_value = b"", b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._buffer = bytearray()
        self._out: io.BufferedWriter | None = None
        self._parts = 0

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._begin, "on_header_field": self._field, "on_header_value": self._value,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise BadRequestError(f"too many form fields (more than {MAX_PARTS})")
        self._headers, self._name, self._buffer = {}, None, bytearray()

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == self.file_field:
            if self._out is not None or self.form.file is not None:
                raise BadRequestError(f"the form has more than one '{self.file_field}' field")
            self._out = open(self.target, "wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self.form.file_bytes += end - start
            if self.form.file_bytes > self.max_file_bytes:
                raise UploadTooLargeError(f"the upload is larger than the {self.max_file_bytes}-byte limit")
            self._out.write(data[start:end])
            return
        self._buffer += data[start:end]
        if len(self._buffer) > MAX_FIELD_BYTES:
            raise BadRequestError(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def _end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out, self.form.file = None, self.target
        elif self._name:
            try:
                self.form.fields[self._name] = self._buffer.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequestError(f"form field {self._name!r} is not UTF-8 text") from None

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


def form_body_limit(max_file_bytes: int) -> int:
    """Bytes a whole upload body may have: the file, plus every part's bounded text and headers."""
    return max_file_bytes + (MAX_FIELD_BYTES + MAX_PART_HEADERS * MAX_PART_HEADER_BYTES) * MAX_PARTS


async def paced(body: AsyncIterator[bytes], idle_timeout_s: float, total_timeout_s: float | None = None,
                ) -> AsyncIterator[bytes]:
    """The body's chunks, refused (408) when one takes longer than `idle_timeout_s` to come or the
    whole body longer than `total_timeout_s`: a client that trickles bytes cannot hold a request open."""
    deadline = None if total_timeout_s is None else time.monotonic() + total_timeout_s
    chunks = body.__aiter__()
    while True:
        wait = idle_timeout_s if deadline is None else min(idle_timeout_s, deadline - time.monotonic())
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), max(wait, 0.0))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"the request body arrived too slowly (over {idle_timeout_s:g} s without "
                                      "data, or too long in all); send it at once") from None
        yield chunk


async def receive_form(content_type: str | None, content_length: str | None, body: AsyncIterator[bytes],
                       file_field: str, target: Path, max_bytes: int) -> ReceivedForm:
    """Stream a multipart body: its `file_field` part to `target` (at most `max_bytes`), the whole
    body at most `form_body_limit(max_bytes)`."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise UnsupportedMediaError("send the task as multipart/form-data (fields name, dataset, method, config)")
    limit = form_body_limit(max_bytes)
    if content_length and content_length.isdigit() and int(content_length) > limit:
        raise UploadTooLargeError(f"the upload ({content_length} bytes) is larger than the {max_bytes}-byte limit")
    receiver = _FormReceiver(file_field, target, max_bytes)
    parser = MultipartParser(options[b"boundary"], receiver.callbacks(), max_header_count=MAX_PART_HEADERS,
                             max_header_size=MAX_PART_HEADER_BYTES)
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > limit:
                raise UploadTooLargeError(f"the upload body is larger than {limit} bytes (the archive's limit is "
                                          f"{max_bytes} bytes, the form's other parts are small)")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        hint = (f" (each part may have {MAX_PART_HEADERS} headers of at most {MAX_PART_HEADER_BYTES} bytes)"
                if "header" in str(exc).lower() else "")
        raise BadRequestError(f"the multipart body is malformed: {exc}{hint}") from None
    finally:
        receiver.close()
    return receiver.form


class UploadGate:
    """At most `slots` dataset uploads received and checked at once, their checks on a pool of that
    many threads: uploads never run on the event loop, and never more of them than the pool allows.
    An upload that finds no slot within `wait_s` is refused (429)."""

    def __init__(self, slots: int, wait_s: float) -> None:
        self.slots, self.wait_s = slots, wait_s
        self._free = asyncio.Semaphore(slots)
        self._pool = ThreadPoolExecutor(slots, thread_name_prefix="upload-check")

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._free.acquire(), self.wait_s)
        except asyncio.TimeoutError:
            raise BusyError(f"{self.slots} dataset uploads are already being received or checked; "
                            "retry in a few seconds") from None
        try:
            yield
        finally:
            self._free.release()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` on the gate's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)


@contextlib.asynccontextmanager
async def received_dataset_form(request: Request, settings: ServiceSettings,
                                gate: UploadGate) -> AsyncIterator[ReceivedForm]:
    """The request's multipart form, its `dataset` part streamed into a scratch folder under
    `work_dir` that is removed when the block ends (whatever the job does with the file, it copies
    it); the block holds one of the gate's slots."""
    async with gate.slot():
        with tempfile.TemporaryDirectory(prefix="gnsp-upload-", dir=settings.scratch()) as scratch:
            yield await receive_form(request.headers.get("content-type"), request.headers.get("content-length"),
                                     paced(request.stream(), settings.body_idle_timeout_s), "dataset",
                                     Path(scratch) / "upload", settings.max_upload_bytes)


def archive_filename(archive: Path) -> str:
    return "dataset.zip" if zipfile.is_zipfile(archive) else "dataset.tar"


def validate_dataset(archive: Path, limits: ArchiveLimits, scratch_parent: str | None) -> dict[str, Any]:
    """Extract and check an uploaded dataset the way the trainer will read it; a summary for the record."""
    with tempfile.TemporaryDirectory(prefix="gnsp-check-", dir=scratch_parent) as scratch:
        layout = validate_image_folder(safe_extract(archive, Path(scratch) / "data", limits), limits)
        images = sum(len(files) for split in layout.splits.values() for files in split.values())
        return {"classes": layout.classnames, "images": images, "splits": sorted(layout.splits)}


def parse_config(raw: str | None) -> dict[str, Any]:
    """The `config` form field: JSON text of the allowed training settings (service.api.task_config)."""
    return parse_task_config(raw)


def parse_tune_body(raw: bytes | str | None) -> dict[str, Any]:
    """A `POST /v1/tune` request (JSON), checked against the schema (422 naming each bad field);
    only the fields the caller set."""
    from service.api.schemas import TuneBody

    try:
        data = json.loads(raw or "{}")
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"the tune request is not valid JSON ({exc.msg}); send e.g. {{\"tasks\": [\"digits\"]}}") from None
    except UnicodeDecodeError:
        raise BadRequestError("the tune request is not valid JSON (not UTF-8 text)") from None
    if not isinstance(data, dict):
        raise BadRequestError('the tune request must be a JSON object, e.g. {"tasks": ["digits"], "trials": 12}')
    try:
        body = TuneBody.model_validate(data)
    except ValidationError as exc:
        raise as_validation_error(exc, ()) from None
    fields = body.model_dump(exclude_unset=True, exclude_none=False)
    if "config" in fields:
        fields["config"] = body.config.settings()  # a null setting means the default: left out
    return fields


def check_task_name(name: str | None) -> str:
    """The name as the schema states it (TASK_NAME_PATTERN), without its outer blanks."""
    if name is None or len(name) > 100 or not re.fullmatch(TASK_NAME_PATTERN, name):
        raise BadRequestError("name must be 1 to 100 characters, not all blank, without control characters")
    return name.strip()


def check_labels(labels: list[str], max_labels: int, max_chars: int) -> list[str]:
    if not labels:
        raise BadRequestError("labels is empty; send at least one candidate label")
    if len(labels) > max_labels:
        raise BadRequestError(f"too many labels ({len(labels)}); the limit is {max_labels} (max_labels): "
                              "split the labels over several requests")
    for label in labels:
        if not isinstance(label, str) or len(label) > max_chars or not re.fullmatch(TASK_NAME_PATTERN, label):
            raise BadRequestError(f"every label must be 1 to {max_chars} characters (max_label_chars), not all "
                                  f"blank, without control characters; got {label!r:.60}")
    if len(set(labels)) != len(labels):
        raise BadRequestError("labels must be unique (scores are keyed by label)")
    return labels


def decode_base64_image(text: str, index: int) -> bytes:
    if not isinstance(text, str):
        raise InvalidImageError(f"images[{index}] must be a base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError(f"images[{index}] is not valid base64") from None


def check_image(raw: bytes, index: int, max_pixels: int) -> None:
    """Refuse what the classifier should never try to decode: non-images, formats off the allow-list,
    images whose header declares more than `max_pixels` (read before any pixel is decoded)."""
    if not raw:
        raise InvalidImageError(f"images[{index}] is empty")
    formats = "/".join(IMAGE_FORMATS)
    try:
        with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImageError(f"images[{index}] is {width}x{height}, over the {max_pixels}-pixel limit "
                                        "(max_classify_pixels); downscale it before sending")
            image.verify()
    except InvalidImageError:
        raise
    except Image.DecompressionBombError:
        raise InvalidImageError(f"images[{index}] declares more pixels than the {max_pixels}-pixel limit "
                                "(max_classify_pixels); downscale it before sending") from None
    except Exception:  # PIL reports undecodable data with many exception types
        raise InvalidImageError(f"images[{index}] is not a readable {formats} image; send one of those formats") \
            from None


async def read_body(request: Request, limit: int, idle_timeout_s: float = 5.0,
                    total_timeout_s: float | None = None) -> bytes:
    """The whole body, refused (413) as soon as it passes `limit` and (408) when it comes too slowly
    (see `paced`); later readers see it via the request."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadTooLargeError(f"the request body ({declared} bytes) is larger than the {limit}-byte limit")
    body = bytearray()
    async for chunk in paced(request.stream(), idle_timeout_s, total_timeout_s):
        body += chunk
        if len(body) > limit:
            raise UploadTooLargeError(f"the request body is larger than the {limit}-byte limit")
    request._body = bytes(body)  # Starlette's own cache: request.form() parses from it
    return request._body


ClassifyInput = tuple[list[bytes], list[str], int | None]


async def read_classify_request(request: Request, settings: ServiceSettings,
                                check_images: bool = True) -> ClassifyInput:
    """Images (raw bytes, checked unless the caller checks each where it decodes it: `check_image`),
    labels (checked) and the pinned version of a classify request."""
    body = await read_body(request, settings.max_classify_bytes, settings.classify_idle_timeout_s,
                           settings.classify_body_timeout_s)
    kind, _ = parse_options_header(request.headers.get("content-type", ""))
    if kind == b"application/json" or kind.endswith(b"+json"):
        try:
            parsed = ClassifyRequest.model_validate_json(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None
        images = [decode_base64_image(text, i) for i, text in enumerate(parsed.images)]
        labels, pinned = parsed.labels, parsed.model_version
    elif kind == b"multipart/form-data":
        images, labels, pinned = await _classify_form(request, settings)
    else:
        raise UnsupportedMediaError("send application/json or multipart/form-data")
    if not images or len(images) > settings.max_classify_images:
        raise BadRequestError(f"send 1 to {settings.max_classify_images} images (max_classify_images), "
                              f"got {len(images)}; split them over several requests")
    labels = check_labels(labels, settings.max_labels, settings.max_label_chars)
    if check_images:
        await run_in_threadpool(lambda: [check_image(raw, i, settings.max_classify_pixels)
                                         for i, raw in enumerate(images)])
    return images, labels, pinned


async def _classify_form(request: Request, settings: ServiceSettings) -> ClassifyInput:
    form = await request.form(max_files=settings.max_classify_images, max_fields=settings.max_labels + 8)
    images = []
    for i, item in enumerate(form.getlist("images")):
        images.append(await item.read() if isinstance(item, UploadFile) else decode_base64_image(item, i))
    labels = [str(label) for label in form.getlist("labels")]
    if len(labels) == 1 and labels[0].lstrip().startswith("["):
        try:
            labels = json.loads(labels[0])
        except json.JSONDecodeError:
            raise BadRequestError("labels looks like a JSON list but does not parse; "
                                  "repeat the field once per label instead") from None
        if not isinstance(labels, list):
            raise BadRequestError("labels must be a list of strings")
    return images, labels, _form_version(form.getlist("model_version"))


def _form_version(values: list[Any]) -> int | None:
    """The pinned version of a classify form: absent, or one field holding an integer."""
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise BadRequestError("model_version must be one form field holding an integer (not a file)")
    try:
        return int(values[0])
    except ValueError:
        raise BadRequestError(f"model_version must be an integer, got {values[0]!r:.40}") from None
