"""A Ray cluster of several nodes on one machine, for tests and benchmarks: a head, and worker nodes
that see their own filesystem.

Each worker node runs under `unshare --mount` with a private tmpfs over /tmp (and over any other
folder named `private`), so it shares no scratch with the head: whatever a job needs there must come
from the store. Nodes are placed by custom resources (`ray start --resources`). Everything runs on
free ports with its own temp folder, and every process the cluster starts carries a marker in its
environment: `LocalCluster.close` ends exactly those (never `ray stop`, which would end every Ray
on the machine), with a bounded wait and then SIGKILL.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_COUNT_ALIVE = """
import sys
from ray._raylet import GcsClient
nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10).values()
print(sum(n.state == 0 for n in nodes))
"""
MARKER = "GNSP_LOCAL_CLUSTER"
"""Environment variable every process of a LocalCluster inherits (its value: the cluster's id)."""
START_TIMEOUT_S = 120.0
START_ATTEMPTS = 3
STOP_GRACE_S = 10.0
# Nodes declared dead within a few seconds, so a killed node's workers fail (and restart) quickly.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                 "health_check_initial_delay_ms": 1000}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def can_isolate_nodes() -> bool:
    """Whether this machine lets us give a node its own mount namespace (root, and `unshare` works)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    resources: dict[str, float]


@dataclass
class LocalCluster:
    """`with LocalCluster(env=...) as cluster:` a head node; `cluster.add_node(...)` adds worker nodes."""

    head_cpus: int = 1
    head_resources: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of every node (PYTHONPATH, store credentials, ...)."""
    cluster_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    token: str = field(default_factory=lambda: uuid.uuid4().hex, repr=False)
    """The cluster's own Ray authentication token (RAY_AUTH_TOKEN), so it never depends on ~/.ray."""

    def __post_init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="gnsp-ray-")  # short: Ray's socket paths live under it
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []
        self._extra: list[subprocess.Popen] = []

    def __enter__(self) -> "LocalCluster":
        try:
            self._start_head()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- nodes -----------------------------------------------------------------------------------

    def node_env(self) -> dict[str, str]:
        return {**os.environ, **self.env, MARKER: self.cluster_id, "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _ports(self) -> list[str]:
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                "--object-store-memory=200000000", "--disable-usage-stats", "--block"]

    def _start_head(self) -> None:
        for attempt in range(START_ATTEMPTS):  # each attempt on fresh ports: a port picked twice fails a start
            if attempt:
                self.port = free_port()
                self.address = f"127.0.0.1:{self.port}"
            command = [ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                       f"--num-cpus={self.head_cpus}", f"--resources={json.dumps(self.head_resources)}",
                       "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                       f"--temp-dir={self.temp_dir}", f"--system-config={json.dumps(SYSTEM_CONFIG)}", *self._ports()]
            head = Node("head", self._spawn(command, "head"), self.head_resources)
            self.nodes = [head]
            try:
                self.wait_for_nodes(1, head)
                return
            except RuntimeError:
                if attempt == START_ATTEMPTS - 1:
                    raise

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float],
                 private: tuple[str, ...] = ()) -> Node:
        """A worker node in its own mount namespace: a fresh tmpfs over /tmp and over each `private` folder."""
        folders = ["/tmp", *private]
        mounts = " && ".join(f"mkdir -p {shlex.quote(f)} && mount -t tmpfs tmpfs {shlex.quote(f)}" for f in folders)
        for attempt in range(START_ATTEMPTS):  # Ray gives a raylet 30 s to register: a busy machine may miss that
            ray_start = " ".join(shlex.quote(a) for a in [
                ray_bin(), "start", f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                f"--resources={json.dumps(resources)}", *self._ports()])  # fresh ports on every attempt
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{mounts} && exec {ray_start}"]
            node = Node(name, self._spawn(command, name), resources)
            self.nodes.append(node)
            try:
                self.wait_for_nodes(sum(n.process.poll() is None for n in self.nodes), node)
                return node
            except RuntimeError:
                self.nodes.remove(node)
                if attempt == START_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def kill_node(self, node: Node) -> None:
        """SIGKILL the node's every process at once (a machine that died, not one that shut down)."""
        _signal_group(node.process, signal.SIGKILL)
        node.process.wait(timeout=STOP_GRACE_S)

    def spawn(self, command: list[str], name: str) -> subprocess.Popen:
        """Run a driver (e.g. `gnsp serve --address`) with the cluster's environment; ended by close()."""
        process = self._spawn(command, name)
        self._extra.append(process)
        return process

    def _spawn(self, command: list[str], name: str) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / f"{name}.log", "ab")
        return subprocess.Popen(command, env=self.node_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def log(self, name: str) -> str:
        path = Path(self.temp_dir) / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.is_file() else ""

    def alive_nodes(self) -> int:
        """How many nodes the cluster's GCS counts alive (asked from a subprocess, so this process,
        which may have its own Ray, stays out of the cluster)."""
        out = subprocess.run([sys.executable, "-c", _COUNT_ALIVE, self.address], env=self.node_env(),
                             capture_output=True, text=True, timeout=60)
        return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else 0

    def wait_for_nodes(self, count: int, starting: Node | None = None, timeout: float = START_TIMEOUT_S) -> None:
        """Until `count` nodes are alive; RuntimeError when the head, or the node `starting`, exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in (self.nodes[0], starting):
                if node is not None and node.process.poll() is not None:
                    _signal_group(node.process, signal.SIGKILL)
                    raise RuntimeError(f"Ray node {node.name} exited while starting: {self.log(node.name)}")
            if self.alive_nodes() >= count:
                return
            time.sleep(1.0)
        raise TimeoutError(f"{count} Ray nodes not alive after {timeout:.0f} s:\n{self.log(self.nodes[-1].name)}")

    def serve(self, store: str, port: int, settings: dict[str, Any], *args: str) -> subprocess.Popen:
        """Start `gnsp serve` on the head against `store` (the tiny model), with `settings` as `--set`
        options; ended by close(). `wait_healthy` waits for it."""
        sets = [f"--set={key}={json.dumps(value)}" for key, value in settings.items()]
        return self.spawn([sys.executable, "-m", "service.cli.serve", "--address", self.address, "--port", str(port),
                           "--store", store, "--model", "tiny", *args, *sets], "serve")

    def wait_healthy(self, client: Any, timeout: float = 300) -> None:
        """Until the service started by `serve` answers /healthz 200 through `client` (an httpx.Client)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if client.get("/healthz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"the service did not answer /healthz:\n{self.log('serve')}")

    # --- teardown --------------------------------------------------------------------------------

    def close(self) -> None:
        """End every process of this cluster: drivers and nodes (SIGTERM, bounded wait, SIGKILL), then
        any straggler that carries the cluster's marker; remove the temp folder."""
        for process in [*self._extra, *(n.process for n in reversed(self.nodes))]:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in [*self._extra, *(n.process for n in self.nodes)]:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)
        for pid in marked_processes(self.cluster_id):
            _kill(pid)
        deadline = time.monotonic() + STOP_GRACE_S
        while marked_processes(self.cluster_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def marked_processes(cluster_id: str) -> list[int]:
    """Processes (not zombies) whose environment carries this cluster's marker."""
    needle = f"{MARKER}={cluster_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and not _zombie(entry):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _zombie(entry: Path) -> bool:
    return ") Z " in (entry / "stat").read_text()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
