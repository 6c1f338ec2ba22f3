"""Schemathesis hooks for tests/test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

A JSON Schema can say that a part is binary and which media types it has, not that its bytes are
a zip of class folders or a decodable image. So where the schema has an opaque file (a dataset
part, an image) and the generated case holds bytes (or base64 text) there, these hooks put real
content of the same kind in its place: a tiny ImageFolder zip, a small PNG. Every other value the
fuzzer drew, including the count of files and whatever makes a case negative, is left as drawn.

`DELETE /v1/tasks/{task_id}` and `DELETE /v1/tune/{job_id}` cancel a job and keep its record (the
API documents that): a GET after one is the record of a cancelled job, not a deleted resource
still served. Schemathesis' use-after-free check reads every DELETE as a removal, so its failure is
dropped exactly when the record shows the cancel took effect, and kept otherwise.

A "schema-violating request accepted" failure is dropped only when the request was not schema-
violating after all: its body, the only part generated as negative, validates against the
operation's own schema (files read as strings). Schemathesis mutates one branch of an `anyOf` or
one constraint of a nullable field and calls the result invalid, though another branch, or null,
admits it (config.projection null after a mutation of its rule, for one). Every body the schema
really refuses that the server accepts is still a failure.
"""

from __future__ import annotations

import base64
import io
import zipfile

import json

import schemathesis
from jsonschema import Draft202012Validator
from PIL import Image
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.core.parameters import ParameterLocation
from schemathesis.openapi.checks import UseAfterFree
from schemathesis.transport.serialization import Binary

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40)}


def _png(colour: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _dataset_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, colour in COLOURS.items():
            for split, count in (("train", 4), ("test", 2)):
                for i in range(count):
                    archive.writestr(f"{split}/{name}/{i}.png", _png(tuple(min(255, c + 5 * i) for c in colour)))
    return buffer.getvalue()


PNG, DATASET = _png(COLOURS["red"]), _dataset_zip()
FILE_TYPES = (bytes, Binary)


def _real(value: object, content: bytes) -> object:
    if isinstance(value, FILE_TYPES):
        return Binary(content) if isinstance(value, Binary) else content
    return value


@schemathesis.hook
def map_case(context, case):
    body, path = case.body, case.operation.path
    if not isinstance(body, dict):
        return case
    if path in ("/v1/tasks", "/v1/tune") and "dataset" in body:
        body["dataset"] = _real(body["dataset"], DATASET)
    if path == "/v1/classify" and isinstance(body.get("images"), list):
        multipart = (case.media_type or "").startswith("multipart/")
        body["images"] = [_real(image, PNG) if multipart else
                          (base64.b64encode(PNG).decode() if isinstance(image, str) else image)
                          for image in body["images"]]
    return case


def _files_as_strings(value: object) -> object:
    """The body as its schema sees it: a file part is a string (`format: binary`)."""
    if isinstance(value, FILE_TYPES):
        return ""
    if isinstance(value, dict):
        return {key: _files_as_strings(item) for key, item in value.items()}
    return [_files_as_strings(item) for item in value] if isinstance(value, list) else value


def _valid_after_all(case) -> bool:
    """Whether a case generated as negative only in its body has a body its schema admits."""
    meta = case.meta
    if meta is None:
        return False
    negative = {location for location, info in meta.components.items() if info.mode.is_negative}
    content = (case.operation.definition.raw.get("requestBody") or {}).get("content") or {}
    schema = (content.get(case.media_type) or {}).get("schema")
    if negative != {ParameterLocation.BODY} or schema is None or "$ref" in json.dumps(schema):
        return False
    return Draft202012Validator(schema).is_valid(_files_as_strings(case.body))


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure but a GET that shows the job a DELETE cancelled, and a "negative" body
    its schema admits."""
    if isinstance(failure, AcceptedNegativeData):
        return not _valid_after_all(case)
    if not isinstance(failure, UseAfterFree) or case.operation.method.upper() != "GET":
        return True
    try:
        record = response.json()
    except ValueError:
        return True
    if not isinstance(record, dict):
        return True
    return not (record.get("status") == "cancelled" or record.get("cancel_requested") or record.get("cancelled"))
