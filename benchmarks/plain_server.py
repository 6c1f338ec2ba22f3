"""The plain server of benchmarks/serve_load.py: what a user would write instead of gnsp's service.

One uvicorn process with a FastAPI route that holds a stored version in memory and classifies
each request on its own (the same decode and forward code as the service, a cached text head, no
Ray, no batching), on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx

PLAIN_SERVER = """
import base64, sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from gnsp_core.zeroshot import TextHeadCache
from service.serving.served_model import load_served_model
from service.store import ModelStore

store, version, cache, port = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
served = load_served_model(ModelStore.open(store), version, cache)
heads = TextHeadCache(8)
app = FastAPI()


class Body(BaseModel):
    images: list[str]
    labels: list[str]


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.post("/v1/classify")
def classify(body: Body):
    images = [base64.b64decode(image) for image in body.images]
    return served.classify([{"images": images, "labels": body.labels}], heads)[0]


uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


@contextlib.contextmanager
def plain_server(store: str, version: int, port: int) -> Iterator[str]:
    """The plain FastAPI + uvicorn server (PLAIN_SERVER) in a process of its own, on 127.0.0.1."""
    cache = tempfile.mkdtemp(prefix="gnsp-plain-")
    process = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, store, str(version), cache, str(port)],
                               cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the plain server exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the plain server did not start within 300 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
