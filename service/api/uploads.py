"""Untrusted input at the HTTP edge: streamed dataset uploads and images to classify.

A dataset upload is parsed as it arrives (python-multipart's streaming parser), the archive part
written straight to a local scratch file and counted, so an oversized upload is refused (413) as
soon as it crosses the limit, never buffered whole in memory. The archive is then checked with
gnsp_core's own safe_extract and validate_image_folder before anything reaches the store.
"""

from __future__ import annotations

import base64
import contextlib
import binascii
import io
import json
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from gnsp_core.data.archives import ArchiveLimits, safe_extract
from gnsp_core.data.folders import validate_image_folder

from service.errors import BadRequestError, InvalidImageError, UnsupportedMediaError, UploadTooLargeError
from service.api.schemas import MAX_LABEL_CHARS, TASK_NAME_PATTERN, ClassifyRequest
from service.settings import ServiceSettings

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 16
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}


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


async def receive_form(content_type: str | None, content_length: str | None, body: AsyncIterator[bytes],
                       file_field: str, target: Path, max_bytes: int) -> ReceivedForm:
    """Stream a multipart body: its `file_field` part to `target`, at most `max_bytes` in all."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise UnsupportedMediaError("send the task as multipart/form-data (fields name, dataset, method, config)")
    if content_length and content_length.isdigit() and int(content_length) > max_bytes + MAX_FIELD_BYTES * MAX_PARTS:
        raise UploadTooLargeError(f"the upload ({content_length} bytes) is larger than the {max_bytes}-byte limit")
    receiver = _FormReceiver(file_field, target, max_bytes)
    parser = MultipartParser(options[b"boundary"], receiver.callbacks())
    try:
        async for chunk in body:
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequestError(f"the multipart body is malformed: {exc}") from None
    finally:
        receiver.close()
    return receiver.form


@contextlib.asynccontextmanager
async def received_dataset_form(request: Request, settings: ServiceSettings) -> AsyncIterator[ReceivedForm]:
    """The request's multipart form, its `dataset` part streamed into a scratch folder under
    `work_dir` that is removed when the block ends (whatever the job does with the file, it copies it)."""
    with tempfile.TemporaryDirectory(prefix="gnsp-upload-", dir=settings.work_dir) as scratch:
        yield await receive_form(request.headers.get("content-type"), request.headers.get("content-length"),
                                 request.stream(), "dataset", Path(scratch) / "upload", settings.max_upload_bytes)


def archive_filename(archive: Path) -> str:
    return "dataset.zip" if zipfile.is_zipfile(archive) else "dataset.tar"


def validate_dataset(archive: Path, limits: ArchiveLimits, scratch_parent: str | None) -> dict[str, Any]:
    """Extract and check an uploaded dataset the way the trainer will read it; a summary for the record."""
    with tempfile.TemporaryDirectory(prefix="gnsp-check-", dir=scratch_parent) as scratch:
        layout = validate_image_folder(safe_extract(archive, Path(scratch) / "data", limits), limits)
        images = sum(len(files) for split in layout.splits.values() for files in split.values())
        return {"classes": layout.classnames, "images": images, "splits": sorted(layout.splits)}


def parse_config(raw: str | None) -> dict[str, Any]:
    """The `config` form field: a JSON object (checked against TrainConfig by the caller)."""
    if raw is None or not raw.strip():
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"config is not valid JSON ({exc.msg}); send an object like {{\"steps\": 100}}") from None
    if not isinstance(config, dict):
        raise BadRequestError("config must be a JSON object of training settings, e.g. {\"steps\": 100}")
    return config


def parse_tune_body(raw: bytes | str | None) -> dict[str, Any]:
    """A `POST /v1/tune` request (JSON), checked against the schema; only the fields the caller set."""
    from pydantic import ValidationError

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
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise BadRequestError(f"invalid tune request: {problems}") from None
    return body.model_dump(exclude_unset=True, exclude_none=False)


def check_task_name(name: str | None) -> str:
    """The name as the schema states it (TASK_NAME_PATTERN), without its outer blanks."""
    if name is None or len(name) > 100 or not re.fullmatch(TASK_NAME_PATTERN, name):
        raise BadRequestError("name must be 1 to 100 characters, not all blank, without control characters")
    return name.strip()


def check_labels(labels: list[str], max_labels: int) -> list[str]:
    labels = [label.strip() if isinstance(label, str) else label for label in labels]
    if not labels:
        raise BadRequestError("labels is empty; send at least one candidate label")
    if len(labels) > max_labels:
        raise BadRequestError(f"too many labels ({len(labels)}); the limit is {max_labels}")
    for label in labels:
        if not isinstance(label, str) or not label or len(label) > MAX_LABEL_CHARS or not label.isprintable():
            raise BadRequestError(f"every label must be 1 to {MAX_LABEL_CHARS} printable characters, got {label!r:.60}")
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
    """Refuse what the classifier should never try to decode: non-images, odd formats, huge images."""
    if not raw:
        raise InvalidImageError(f"images[{index}] is empty")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format not in IMAGE_FORMATS:
                raise InvalidImageError(f"images[{index}] is {image.format}; send PNG or JPEG")
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImageError(f"images[{index}] is {width}x{height}, over the {max_pixels}-pixel limit")
            image.verify()
    except InvalidImageError:
        raise
    except Exception:  # PIL reports undecodable data with many exception types
        raise InvalidImageError(f"images[{index}] is not a readable PNG/JPEG image") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes `limit`; later readers see it via the request."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadTooLargeError(f"the request body ({declared} bytes) is larger than the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise UploadTooLargeError(f"the request body is larger than the {limit}-byte limit")
    request._body = bytes(body)  # Starlette's own cache: request.form() parses from it
    return request._body


ClassifyInput = tuple[list[bytes], list[str], int | None]


async def read_classify_request(request: Request, settings: ServiceSettings) -> ClassifyInput:
    """Images (raw bytes, checked), labels (checked) and the pinned version of a classify request."""
    body = await read_body(request, settings.max_classify_bytes)
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
        raise BadRequestError(f"send 1 to {settings.max_classify_images} images, got {len(images)}")
    labels = check_labels(labels, settings.max_labels)
    await run_in_threadpool(lambda: [check_image(raw, i, settings.max_image_pixels) for i, raw in enumerate(images)])
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
    raw_version = form.get("model_version")
    pinned = None
    if isinstance(raw_version, str) and raw_version.strip() and raw_version.strip() != "null":
        try:
            pinned = int(raw_version)
        except ValueError:
            raise BadRequestError(f"model_version must be an integer, got {raw_version!r:.40}") from None
    return images, labels, pinned
