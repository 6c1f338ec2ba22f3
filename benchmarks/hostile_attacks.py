"""The attacks of benchmarks/hostile.py: the payloads a hostile client sends, and how each is sent.

Each attack is an async function of an httpx client (pointed at the service) and the payloads,
answering a short description of what the service answered ("400 bad_image", "202 queued
(cancelled)", ...). Tasks the service accepts are cancelled at once, so nothing trains.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import struct
import zipfile
import zlib
from typing import Any, Awaitable, Callable

import httpx
import numpy as np
from PIL import Image

TOKEN = "hostile-benchmark-token"
LABELS = ["a dog", "a cat", "a car", "a tree", "a house"]


# ------------------------------------------------------------------------------- payloads


def jpeg(size: tuple[int, int], quality: int = 85) -> bytes:
    """A smooth colour gradient: decoded like a photo, small to send."""
    x = np.linspace(0, 255, size[0]).astype(np.uint8)[None, :]
    y = np.linspace(0, 255, size[1]).astype(np.uint8)[:, None]
    pixels = np.stack(np.broadcast_arrays(x, y, x // 2 + y // 2), axis=2)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 10_000) -> bytes:
    """A real decompression bomb: side x side RGB of zeros (300 MB decoded at 10,000) in about 300 KB."""
    row = b"\0" * (1 + 3 * side)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def dataset_zip(extra: dict[str, bytes] | None = None) -> bytes:
    """A valid two-class dataset (4 small PNGs), with `extra` entries added."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for cls, colour in (("red", (220, 30, 30)), ("blue", (30, 60, 220))):
            for i in range(2):
                image = io.BytesIO()
                Image.new("RGB", (32, 32), colour).save(image, format="PNG")
                zf.writestr(f"{cls}/{i}.png", image.getvalue())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buffer.getvalue()


def empty_folders_zip(count: int = 100_000) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(count):
            zf.writestr(zipfile.ZipInfo(f"data/folder-{i:06d}/"), b"")
    return buffer.getvalue()


def payloads() -> dict[str, Any]:
    photo = jpeg((224, 224))
    good = {"images": [b64(photo)], "labels": LABELS}
    truncated = jpeg((96, 96), quality=95)
    return {"good": good, "photo": photo, "truncated": b64(truncated[: len(truncated) // 3]),
            "huge_jpeg": b64(jpeg((6000, 6000), quality=70)), "bomb": b64(bomb_png()),
            "zip": dataset_zip(), "folders_zip": empty_folders_zip(),
            "traversal_zip": dataset_zip({"../../outside.png": b"x"})}


# -------------------------------------------------------------------------------- attacks

Attack = Callable[[httpx.AsyncClient, dict[str, Any]], Awaitable[str]]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def status_of(response: httpx.Response) -> str:
    try:
        code = response.json().get("error", {}).get("code", "")
    except ValueError:
        code = ""
    return f"{response.status_code} {code}".strip()


async def classify(http: httpx.AsyncClient, body: dict) -> httpx.Response:
    return await http.post("/v1/classify", json=body)


async def task(http: httpx.AsyncClient, dataset: bytes, config: dict | None = None, **fields: str) -> str:
    """POST /v1/tasks; a task the service queues (202) is cancelled at once, so nothing trains."""
    data = {"name": "hostile", **fields, **({"config": json.dumps(config)} if config is not None else {})}
    response = await http.post("/v1/tasks", data=data, files={"dataset": ("d.zip", dataset, "application/zip")},
                               headers=AUTH)
    if response.status_code == 202:
        await http.delete(f"/v1/tasks/{response.json()['task_id']}", headers=AUTH)
        return "202 queued (cancelled)"
    return status_of(response)


async def truncated_among_good(http: httpx.AsyncClient, p: dict) -> str:
    bodies = [p["good"]] * 7 + [{"images": [p["truncated"]], "labels": LABELS}]
    answers = await asyncio.gather(*(classify(http, body) for body in bodies))
    good = sum(r.status_code == 200 for r in answers[:7])
    return f"{status_of(answers[7])} ({good}/7 good answered 200)"


async def raw_multipart(http: httpx.AsyncClient, parts: list[str]) -> str:
    boundary = "hostile-boundary"
    body = "".join(f"--{boundary}\r\n{part}\r\n" for part in parts) + f"--{boundary}--\r\n"
    response = await http.post("/v1/tasks", content=body.encode(), headers={
        **AUTH, "content-type": f"multipart/form-data; boundary={boundary}"})
    return status_of(response)


async def oversized_body(http: httpx.AsyncClient, p: dict) -> str:
    body = b'{"images": ["' + b"A" * (40 * 1024**2) + b'"], "labels": ["a"]}'
    try:
        response = await http.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    except httpx.HTTPError as exc:  # the server may close while the client still sends
        return f"connection closed ({type(exc).__name__})"
    return status_of(response)


async def slow_body(http: httpx.AsyncClient, p: dict) -> str:
    """Declares a 1,000-byte classify body, sends 12 bytes of it, then nothing: the service must give
    up on its own. (A raw socket: an HTTP client would not read the answer before its body is sent.)"""
    reader, writer = await asyncio.open_connection(http.base_url.host, http.base_url.port)
    try:
        writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"images\": [")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()
    status = head.split(b" ", 2)[1].decode()
    code = re.search(rb'"code":\s*"([a-z_]+)"', rest)
    return f"{status} {code.group(1).decode() if code else ''}".strip()


async def unknown_pins(http: httpx.AsyncClient, p: dict) -> str:
    answers = await asyncio.gather(*(classify(http, {**p["good"], "model_version": 1000 + i}) for i in range(50)))
    return " / ".join(sorted({status_of(r) for r in answers})) + " (50 requests)"


async def old_version_churn(http: httpx.AsyncClient, p: dict) -> str:
    """40 requests pinned round-robin to versions 2-5 (more than the 3 a replica keeps): loads churn."""
    answers = await asyncio.gather(*(classify(http, {**p["good"], "model_version": 2 + i % 4}) for i in range(40)))
    counts: dict[str, int] = {}
    for response in answers:
        counts[status_of(response)] = counts.get(status_of(response), 0) + 1
    worst = max(counts, key=lambda status: int(status.split()[0]))  # 200s are fair answers; the rest?
    return f"{worst} ({', '.join(f'{n}x {status}' for status, n in sorted(counts.items()))} of 40 pinned)"


ATTACKS: dict[str, Attack] = {
    "truncated JPEG among 7 good": truncated_among_good,
    "8 images of 6000x6000": lambda h, p: classify(h, {"images": [p["huge_jpeg"]] * 8, "labels": LABELS}),
    "decompression bomb PNG (10000^2)": lambda h, p: classify(h, {"images": [p["bomb"]], "labels": LABELS}),
    "5,000 labels": lambda h, p: classify(h, {**p["good"], "labels": [f"label {i}" for i in range(5000)]}),
    "one 100,000-char label": lambda h, p: classify(h, {**p["good"], "labels": ["a", "x" * 100_000]}),
    "40 MB classify body": oversized_body,
    "stalled classify body": slow_body,
    "50 pins to unknown versions": unknown_pins,
    "pins churning 4 old versions": old_version_churn,
    'config {"method": 5}': lambda h, p: task(h, p["zip"], {"method": 5}),
    'config {"trainable": "(a+)+$"}': lambda h, p: task(h, p["zip"], {"trainable": "(a+)+$"}),
    'config {"projection": {"scope": "("}}': lambda h, p: task(h, p["zip"], {"projection": {"scope": "("}}),
    'config {"num_workers": 64}': lambda h, p: task(h, p["zip"], {"num_workers": 64}),
    'config {"device": "cuda:7"}': lambda h, p: task(h, p["zip"], {"device": "cuda:7"}),
    "zip of 100,000 empty folders": lambda h, p: task(h, p["folders_zip"]),
    "zip with ../ path": lambda h, p: task(h, p["traversal_zip"]),
    "PNG as the dataset": lambda h, p: task(h, p["photo"]),
    "100 form parts": lambda h, p: raw_multipart(h, [f'Content-Disposition: form-data; name="f{i}"\r\n\r\nx'
                                                   for i in range(100)]),
    "part with 50 headers": lambda h, p: raw_multipart(h, ['Content-Disposition: form-data; name="name"\r\n' +
                                                         "".join(f"X-{i}: {'p' * 200}\r\n" for i in range(50)) +
                                                         "\r\nx"]),
    "write without the token": lambda h, p: h.post("/v1/models/1/activate"),
}

