"""End to end over real HTTP on 127.0.0.1: learn a task, classify with the new version, roll back;
queue and cancel jobs; and kill -9 the whole service mid-job, then restart it on the same store
(`gnsp serve` as a user starts it: its private Ray behind Serve's HAProxy ingress)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from ray.serve._private.constants import (RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT,
                                         RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT)

from service.serving.classify_http import parse_server_timing
from service_support import (ENDED, FAST_CONFIG, alive_actors, alive_train_controllers, colour_zip, free_port,
                             png_b64, png_bytes, service_settings, running_service, wait_for, wait_gone)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]
REPLICA_HTTP_PORTS = (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT)
"""Where Serve's HAProxy ingress puts the ingress replicas' own HTTP ports."""


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    with running_service(service_settings(tmp), "gnsp-e2e") as client:
        yield client, tmp


def upload(client: httpx.Client, tmp: Path, name: str, colours: list[str], config: dict) -> str:
    response = client.post("/v1/tasks", data={"name": name, "config": json.dumps(config)},
                           files={"dataset": (f"{name}.zip", colour_zip(tmp, colours), "application/zip")})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    return response.json()["task_id"]


def classify(client: httpx.Client, labels: list[str], version: int | None = None) -> dict:
    response = client.post("/v1/classify", json={"images": [png_b64("red"), png_b64("blue")], "labels": labels,
                                                 "model_version": version})
    assert response.status_code == 200, response.text
    return response.json()


class ClassifyLoad:
    """Classify requests from a second thread, until the block ends (at least three of them)."""

    def __init__(self, client: httpx.Client) -> None:
        self.client, self.stop = client, threading.Event()
        self.statuses: set[int] = set()
        self.versions: set[int] = set()
        self.count = 0
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set() or self.count < 3:
            response = self.client.post("/v1/classify", json={"images": [png_b64("red")], "labels": ["red", "blue"]})
            self.statuses.add(response.status_code)
            self.versions.add(response.json().get("model_version"))
            self.count += 1

    def __enter__(self) -> "ClassifyLoad":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(120)


def test_learn_a_task_then_classify_and_roll_back(service):
    client, tmp = service
    models = client.get("/v1/models").json()
    assert models["active_version"] == 1 and [m["version"] for m in models["models"]] == [1]

    controllers = alive_train_controllers()
    task_id = upload(client, tmp, "rgb", ["red", "green", "blue"], FAST_CONFIG)
    seen = []
    while (job := client.get(f"/v1/tasks/{task_id}").json())["status"] not in ENDED:
        seen.append(job["progress"])
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    assert seen == sorted(seen) and all(0 <= p < 1 for p in seen) and job["progress"] == 1.0
    assert any(0 < p < 1 for p in seen)  # live progress while it ran
    assert job["model_version"] == 2 and job["activated"] and job["base_version"] == 1
    assert {"task_accuracy", "heldout_accuracy", "base_heldout_accuracy"} <= set(job["metrics"])
    assert job["dataset"]["classes"] == ["blue", "green", "red"]
    wait_gone(controllers, "the finished run's Ray Train controller")
    assert len(alive_actors("AttemptHost")) == 1  # the process the attempt ran in waits, warm, for the next

    version = client.get("/v1/models/2").json()
    assert version["tasks"] == ["rgb"] and version["parent"] == 1 and version["active"] and version["gate"]["passed"]
    answer = classify(client, ["red", "green", "blue"])
    assert answer["model_version"] == 2 and len(answer["results"]) == 2
    assert set(answer["results"][0]["scores"]) == {"red", "green", "blue"}
    assert abs(sum(answer["results"][0]["scores"].values()) - 1) < 1e-3
    assert "timing" not in answer
    timed = client.post("/v1/classify", json={"images": [png_b64("red")], "labels": ["red", "blue"]})
    assert timed.status_code == 200, timed.text
    hops = parse_server_timing(timed.headers["server-timing"])
    assert hops["ingress"] >= hops["classifier"] >= hops["forward"] >= hops["pass"] > 0
    assert hops["batch"] >= 1
    multipart = client.post("/v1/classify", files=[("images", ("a.png", png_bytes("red"), "image/png"))],
                            data={"labels": ["red", "blue"]})
    assert multipart.status_code == 200 and multipart.json()["model_version"] == 2

    with ClassifyLoad(client) as load:  # requests keep flowing while the active version moves
        rollback = client.post("/v1/models/1/activate")
        assert rollback.json() == {"active_version": 1, "previous_version": 2}
        assert client.post("/v1/models/2/activate").json()["active_version"] == 2
        assert client.post("/v1/models/1/activate").json()["active_version"] == 1
    assert load.statuses == {200} and load.versions <= {1, 2} and load.count >= 3
    # The classifier reads the pointer at most once per active_pointer_ttl_s (1 s): the swap reaches
    # new requests within that time.
    deadline = time.monotonic() + 3
    while classify(client, ["red", "green", "blue"])["model_version"] != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert classify(client, ["red", "green", "blue"])["model_version"] == 1
    assert classify(client, ["red", "green"], version=2)["model_version"] == 2  # a pinned version still answers
    models = client.get("/v1/models").json()
    assert models["active_version"] == 1 and [h["version"] for h in models["history"]] == [1, 2, 1, 2, 1]

    metrics = client.get("/metrics").text  # request counts are Ray metrics (test_metrics_replicas.py)
    assert "gnsp_active_model_version 1.0" in metrics and 'gnsp_jobs{status="succeeded"} 1.0' in metrics
    assert [t["task_id"] for t in client.get("/v1/tasks").json()["tasks"]] == [task_id]


def test_second_upload_waits_and_cancel_stops_the_trainer(service):
    import ray

    client, tmp = service
    cpus = ray.available_resources().get("CPU", 0)
    controllers = alive_train_controllers()
    first = upload(client, tmp, "long", ["red", "yellow"], {**FAST_CONFIG, "steps": 100_000})
    second = upload(client, tmp, "next", ["green", "blue"], FAST_CONFIG)
    running = wait_for(client, first, ("running",))
    assert running["status"] == "running"
    assert client.get(f"/v1/tasks/{second}").json()["status"] == "queued"  # never two jobs on one base
    assert client.delete(f"/v1/tasks/{second}").json()["status"] == "cancelled"
    while (job := client.get(f"/v1/tasks/{first}").json())["phase"] != "train":  # the trainer is running
        assert job["status"] == "running", job
        time.sleep(0.2)
    hosts = alive_actors("AttemptHost")
    assert len(hosts) == 1
    cancelling = client.delete(f"/v1/tasks/{first}").json()  # answers once it ended, or after a few seconds
    assert cancelling["status"] == "cancelled" or cancelling["cancel_requested"], cancelling
    assert wait_for(client, first)["status"] == "cancelled"
    assert client.delete(f"/v1/tasks/{first}").status_code == 409
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < cpus:  # the training worker's CPU is free again
        assert time.monotonic() < deadline, "the cancelled trainer still holds its CPU"
        time.sleep(0.2)
    assert wait_for(client, second)["status"] == "cancelled"  # it never ran
    assert [m["version"] for m in client.get("/v1/models").json()["models"]] == [1, 2]
    wait_gone(controllers, "the cancelled run's Ray Train controller")
    assert not hosts & alive_actors("AttemptHost")  # whatever the cancelled attempt left went with its process


def start_gnsp_serve(store: Path, tmp: Path, port: int) -> subprocess.Popen:
    """`gnsp serve` in its own process group (its private Ray lives and dies with it)."""
    settings = service_settings(tmp)
    command = [sys.executable, "-m", "service.cli.serve", "--store", str(store), "--model", "tiny",
               "--port", str(port), "--num-cpus", "2", "--set", f"heldout={settings.heldout}",
               "--set", "reference=tests.conftest:reference_pairs", "--set", "default_method=finetune",
               "--set", "checkpoint_every=2", "--set", "max_heldout_drop=100", "--set", f"work_dir={tmp}"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    log = open(tmp / f"serve-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def session_members(process: subprocess.Popen) -> list[int]:
    """Every live process of the service's session (Ray puts its workers in process groups of their own)."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat[stat.rindex(")") + 2:].split()[3]) == process.pid:
            members.append(int(entry.name))
    return members


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the service and every process of its session, so that no ingress of the old one
    (HAProxy, a proxy actor, a replica's port) answers on the port."""
    for pid in session_members(process):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(30)


def session_listeners(process: subprocess.Popen) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket, IPv4 or IPv6, a process of the service's session listens on."""
    inodes = set()
    for pid in session_members(process):
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue  # ended meanwhile
        inodes |= {link[len("socket:["):-1] for link in links if link.startswith("socket:[")}
    listeners = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                listeners.add((proc_net_address(address), int(port, 16)))
    return listeners


def serving_listeners(process: subprocess.Popen, port: int, timeout: float = 30) -> set[tuple[str, int]]:
    """The session's listeners once one of them is the service's port. An HAProxy reload (Serve
    reloads it as applications change) hands the port from the old HAProxy process to a new one:
    a look taken in between can see neither holding it."""
    deadline = time.monotonic() + timeout
    while ("127.0.0.1", port) not in (listeners := session_listeners(process)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return listeners


def proc_net_address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host byte order) as text."""
    raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, len(hex_address), 8))
    return str(ipaddress.ip_address(raw))


def wait_healthy(client: httpx.Client, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "gnsp serve exited"
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "gnsp serve did not become healthy"
        time.sleep(0.5)


def test_service_killed_mid_job_restarts_with_store_intact(own_ray_slot, tmp_path):
    store, port = tmp_path / "store", free_port()
    process = start_gnsp_serve(store, tmp_path, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            wait_healthy(client, process)
            listeners = serving_listeners(process, port)
            replicas = {(host, p) for host, p in listeners if REPLICA_HTTP_PORTS[0] <= p <= REPLICA_HTTP_PORTS[1]}
            assert ("127.0.0.1", port) in listeners, listeners
            assert replicas and {host for host, _ in replicas} == {"127.0.0.1"}, listeners  # HAProxy's, on --host
            task_id = upload(client, tmp_path, "rgb", ["red", "green", "blue"], {**FAST_CONFIG, "steps": 12})
            while (job := client.get(f"/v1/tasks/{task_id}").json())["progress"] < 0.4:  # past 2 checkpoints
                assert job["status"] in ("queued", "running"), job
                time.sleep(0.2)
            kill_session(process)
            manifests = sorted(p.relative_to(store) for p in store.glob("models/*/manifest.json"))
            assert [str(p) for p in manifests] == ["models/v000001/manifest.json"]
            assert json.loads((store / "active.json").read_text())["version"] == 1

            process = start_gnsp_serve(store, tmp_path, port)
            wait_healthy(client, process)
            models = client.get("/v1/models").json()
            assert models["active_version"] == 1 and [m["version"] for m in models["models"]] == [1]
            job = client.get(f"/v1/tasks/{task_id}").json()
            assert job["status"] in ("queued", "running") and job.get("attempts", 0) >= 1
            job = wait_for(client, task_id)
            assert job["status"] == "succeeded" and job["attempts"] == 2, job
            assert job["metrics"].get("resumed_from"), job  # continued from its checkpoint, not from scratch
            assert client.get("/v1/models").json()["active_version"] == 2
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 0
    finally:
        kill_session(process)


def test_serve_config_yaml_builds_the_app():
    """deploy/serve_config.yaml is a valid Serve config whose builder accepts its args."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from service.api.app import build_app, build_classify_app

    raw = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    app = config.applications[0]
    assert app.import_path == "service.api.app:build_app"
    assert {d["name"] for d in raw["applications"][0]["deployments"]} == {"Ingress", "JobRunner"}
    assert build_app(app.args) is not None
    classify = config.applications[1]
    assert (classify.import_path, classify.route_prefix) == ("service.api.app:build_classify_app", "/v1/classify")
    assert classify.args == app.args and {d["name"] for d in raw["applications"][1]["deployments"]} == {"Classifier"}
    assert build_classify_app(classify.args) is not None
