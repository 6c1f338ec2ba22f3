"""The REST service under hostile clients: each attack's answer, and what a well-behaved neighbour sees.

Starts a private local Ray with the gnsp app on 127.0.0.1 (gnsp-mini, or `--model tiny` for a
quick run) with an API token set, and stores copies of version 1 as versions 2 to 5 (old versions
a client may pin). A neighbour classifies one small JPEG over 5 labels in a closed loop, first
alone (its quiet p99), then during each attack. For each attack the table gives the status the
attacker got and how long it took, the neighbour's failures and p99 during the attack (and as a
multiple of the quiet p99), and the peak resident memory of the service's processes (every
process of this Ray session, sampled every 0.1 s) above the idle level measured before the
attacks. Targets: every attack answered 4xx within 2 s, 0 neighbour failures, neighbour p99 at
most 3x quiet, peak memory at most 1 GiB above idle. Every request and loop is bounded in count
and time, and only 127.0.0.1 is contacted. Attacks that the service accepts (a 202 task) are
cancelled at once, so no training runs behind the measurements.

    python benchmarks/hostile.py --model tiny                # quick (about 3 minutes)
    python benchmarks/hostile.py --out out/hostile           # gnsp-mini (the default model)

Prints a markdown table and writes hostile.json to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx
import numpy as np
from PIL import Image

TOKEN = "hostile-benchmark-token"
LABELS = ["a dog", "a cat", "a car", "a tree", "a house"]
ANSWER_TARGET_S = 2.0
P99_FACTOR = 3.0
MEMORY_TARGET = 1024**3


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


# ------------------------------------------------------------------------- measurements


class MemorySampler:
    """Peak summed RSS of this process's descendants (this Ray session: GCS, raylet, every worker)."""

    def __init__(self, every_s: float = 0.1) -> None:
        import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
        import psutil

        self.psutil, self.every_s = psutil, every_s
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        total = 0
        for child in self.psutil.Process(os.getpid()).children(recursive=True):
            try:
                total += child.memory_info().rss
            except self.psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.rss())

    def reset(self) -> int:
        self.peak = self.rss()
        return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def p99(latencies: list[float]) -> float:
    ms = sorted(1000 * x for x in latencies)
    return ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan")


async def neighbour(http: httpx.AsyncClient, body: dict, stop: asyncio.Event, latencies: list[float],
                    failures: list[str]) -> None:
    """A well-behaved client: one request at a time until `stop`."""
    while not stop.is_set():
        start = time.perf_counter()
        try:
            response = await http.post("/v1/classify", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                failures.append(status_of(response))
        except httpx.HTTPError as exc:
            failures.append(type(exc).__name__)


async def quiet(url: str, body: dict, seconds: float) -> list[float]:
    latencies: list[float] = []
    failures: list[str] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for _ in range(3):
            await http.post("/v1/classify", json=body)  # warm: version loaded, head cached
        job = asyncio.create_task(neighbour(http, body, stop, latencies, failures))
        await asyncio.sleep(seconds)
        stop.set()
        await job
    return latencies


async def under_attack(url: str, attack: Attack, p: dict, window_s: float, timeout_s: float) -> dict[str, Any]:
    """The attack beside the neighbour; the neighbour runs `window_s` or until the attack ends."""
    latencies: list[float] = []
    failures: list[str] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as http, \
            httpx.AsyncClient(base_url=url, timeout=timeout_s) as attacker:
        job = asyncio.create_task(neighbour(http, p["good"], stop, latencies, failures))
        await asyncio.sleep(0.3)
        start = time.perf_counter()
        try:
            answer = await asyncio.wait_for(_answer(attacker, attack, p), timeout_s)
        except asyncio.TimeoutError:
            answer = f"no answer in {timeout_s:g} s"
        took = time.perf_counter() - start
        await asyncio.sleep(max(0.0, window_s - took))
        stop.set()
        await job
    return {"answer": answer, "answer_s": took, "neighbour_requests": len(latencies) + len(failures),
            "neighbour_failures": len(failures), "neighbour_failure_kinds": sorted(set(failures)),
            "neighbour_p99_ms": p99(latencies)}


async def _answer(http: httpx.AsyncClient, attack: Attack, p: dict) -> str:
    result = await attack(http, p)
    return status_of(result) if isinstance(result, httpx.Response) else result


# ------------------------------------------------------------------------------------ run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from service.api.app import deploy_service
    from service.settings import ServiceSettings
    from service.store import ModelStore
    from serve_load import add_copy_of_version  # a sibling script: old versions a client may pin

    p = payloads()
    work = Path(tempfile.mkdtemp(prefix="gnsp-hostile-"))
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = args.port or free_port()  # after Ray has taken its own ports (its agent listens on 52365)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    settings = ServiceSettings(store=str(work / "store"), model=args.model, heldout=None, reference=None,
                               work_dir=str(work), api_token=TOKEN)
    rows = []
    try:
        deploy_service(settings, "gnsp")
        store = ModelStore.open(settings.store)
        for _ in range(4):
            add_copy_of_version(store, 1)
        memory = MemorySampler()
        quiet_latencies = asyncio.run(quiet(url, p["good"], args.quiet))
        idle = memory.reset()
        quiet_p99 = p99(quiet_latencies)
        print(f"quiet: {len(quiet_latencies)} requests, p99 {quiet_p99:.1f} ms; idle RSS {idle / 2**20:.0f} MiB",
              flush=True)
        for name, attack in ATTACKS.items():
            if args.only and not any(word in name for word in args.only):
                continue
            before = memory.reset()
            row = {"attack": name, **asyncio.run(under_attack(url, attack, p, args.window, args.timeout))}
            row["peak_rss_over_idle_mib"] = (memory.peak - idle) / 2**20
            row["peak_rss_over_start_mib"] = (memory.peak - before) / 2**20
            row.update(verdict(row, quiet_p99, idle, memory.peak))
            rows.append(row)
            print(f"  {name}: {row['answer']} in {row['answer_s']:.2f} s; neighbour {row['neighbour_failures']} "
                  f"failed, p99 {row['neighbour_p99_ms']:.0f} ms", flush=True)
        memory.stop()
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return {"model": args.model or "gnsp-mini", "quiet_p99_ms": quiet_p99, "quiet_requests": len(quiet_latencies),
            "idle_rss_mib": idle / 2**20, "rows": rows,
            "targets": {"answer_4xx_within_s": ANSWER_TARGET_S, "neighbour_failures": 0,
                        "neighbour_p99_over_quiet": P99_FACTOR, "peak_rss_over_idle_mib": MEMORY_TARGET / 2**20},
            "all_met": all(row["met"] for row in rows)}


def verdict(row: dict[str, Any], quiet_p99: float, idle: int, peak: int) -> dict[str, Any]:
    status = row["answer"].split()[0]
    checks = {"answered_4xx": status.isdigit() and 400 <= int(status) < 500,
              "within_2s": row["answer_s"] <= ANSWER_TARGET_S,
              "no_neighbour_failures": row["neighbour_failures"] == 0,
              "neighbour_p99_ok": row["neighbour_p99_ms"] <= P99_FACTOR * quiet_p99,
              "memory_ok": peak - idle <= MEMORY_TARGET}
    return {"checks": checks, "met": all(checks.values()), "p99_over_quiet": row["neighbour_p99_ms"] / quiet_p99}


def table(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']}; neighbour quiet p99 {result['quiet_p99_ms']:.1f} ms "
             f"({result['quiet_requests']} requests); idle RSS {result['idle_rss_mib']:.0f} MiB", "",
             "| attack | answer | time (s) | neighbour failed | neighbour p99 ms (x quiet) | peak RSS over idle "
             "(over the attack's start), MiB | targets |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        missed = [name for name, ok in row["checks"].items() if not ok]
        lines.append(f"| {row['attack']} | {row['answer']} | {row['answer_s']:.2f} | {row['neighbour_failures']}/"
                     f"{row['neighbour_requests']} | {row['neighbour_p99_ms']:.0f} ({row['p99_over_quiet']:.1f}x) | "
                     f"{row['peak_rss_over_idle_mib']:.0f} ({row['peak_rss_over_start_mib']:.0f}) | {'met' if row['met'] else 'missed: ' + ', '.join(missed)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="open_clip name or 'tiny'; left out: gnsp-mini")
    parser.add_argument("--quiet", type=float, default=5.0, help="seconds of neighbour load alone (quiet p99)")
    parser.add_argument("--window", type=float, default=3.0, help="least seconds the neighbour runs per attack")
    parser.add_argument("--timeout", type=float, default=30.0, help="longest wait for any one answer (s)")
    parser.add_argument("--only", nargs="*", default=None, help="run only attacks whose name contains a word")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--out", type=Path, default=Path("out/hostile"))
    args = parser.parse_args()
    result = run(args)
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hostile.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out / 'hostile.json'}")


if __name__ == "__main__":
    main()
