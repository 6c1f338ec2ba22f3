"""Several Ray nodes that share no disk, the store on a real S3 object store (SeaweedFS).

A head node runs the service (`gnsp serve --address`); a second node, in its own mount namespace
with a private tmpfs over /tmp (and so over the service's scratch folder), offers the `trainer`
resource that the training workers ask for. Through the REST API a task is uploaded and its job
starts on that node; the node is killed mid-task; a replacement node joins and the job resumes from
its checkpoint in the store, publishes a version, and classify answers with it. Then, on the same
cluster, a search (`POST /v1/tune`) trains its trial on the trainer node and keeps its records in
the store; that node is killed while the trial learns its second task, and on a replacement node
the trial resumes from the checkpoint it reported after the first. Nothing reaches the workers as
a path of the head: had it, the workers could not read it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pyarrow.fs as pafs
import pytest

from ray_nodes import LocalCluster, Node, can_isolate_nodes, free_port
from service_support import colour_zip, png_b64, wait_for, write_colour_folder

pytestmark = [pytest.mark.integration, pytest.mark.e2e,
              pytest.mark.skipif(not can_isolate_nodes(), reason="needs root and `unshare --mount`")]
ROOT = Path(__file__).resolve().parents[1]
TRAINER = {"trainer": 1}
STEPS, CHECKPOINT_EVERY = 12, 2


def service_settings(scratch: Path, heldout: Path) -> dict:
    return {"work_dir": str(scratch), "heldout": str(heldout), "max_heldout_drop": 100.0,
            "default_method": "finetune", "checkpoint_every": CHECKPOINT_EVERY, "cpus_per_worker": 1,
            "worker_resources": TRAINER}


def checkpoints(fs: pafs.FileSystem, run: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(run, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.base_name.startswith("checkpoint_") and i.type == pafs.FileType.Directory)


def test_a_job_and_a_search_on_a_node_without_shared_disk_survive_losing_that_node(own_ray_slot, seaweedfs, tmp_path):
    store = seaweedfs.uri()
    scratch = Path("/tmp") / f"gnsp-scratch-{tmp_path.name}"  # private on every worker node (its own /tmp)
    heldout = write_colour_folder(tmp_path / "heldout", ["red", "green", "blue"], n_train=2, n_test=2, seed=7)
    port = free_port()
    env = {**seaweedfs.env(), "PYTHONPATH": str(ROOT), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    try:
        with LocalCluster(head_cpus=1, env=env) as cluster, \
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            cluster.serve(store, port, service_settings(scratch, heldout))
            trainer = lose_the_trainer_node_mid_job(cluster, client, seaweedfs, store, scratch, tmp_path)
            lose_the_trainer_node_mid_search(cluster, client, seaweedfs, store, tmp_path, trainer)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def lose_the_trainer_node_mid_job(cluster: LocalCluster, client: httpx.Client, seaweedfs, store: str,
                                  scratch: Path, tmp_path: Path) -> Node:
    """Returns the replacement trainer node."""
    cluster.wait_healthy(client, timeout=240)
    print("service healthy", flush=True)
    first = cluster.add_node("trainer-1", num_cpus=1, resources=TRAINER)

    response = client.post("/v1/tasks", data={"name": "rgb", "config": json.dumps(
        {"steps": STEPS, "batch_size": 8, "warmup_steps": 1, "lr": 1e-3})},
        files={"dataset": ("rgb.zip", colour_zip(tmp_path, ["red", "green", "blue"], n_train=8), "application/zip")})
    assert response.status_code == 202, response.text
    task_id = response.json()["task_id"]

    fs, run = seaweedfs.filesystem(), f"{store.removeprefix('s3://')}/runs/{task_id}"
    deadline = time.monotonic() + 300
    while len(checkpoints(fs, run)) < 2:  # the workers on the trainer node checkpoint into the store (the first one committed)
        job = client.get(f"/v1/tasks/{task_id}").json()
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, with_log(job, cluster)
        time.sleep(0.3)
    cluster.kill_node(first)
    print(f"trainer node killed after checkpoints {checkpoints(fs, run)}", flush=True)
    assert client.get(f"/v1/tasks/{task_id}").json()["status"] == "running"
    second = cluster.add_node("trainer-2", num_cpus=2, resources=TRAINER)  # 2: room for a search trial beside its worker

    print("replacement trainer node joined", flush=True)
    job = wait_for(client, task_id, timeout=300)
    assert job["status"] == "succeeded", with_log(job, cluster)
    assert job["model_version"] == 2 and job["activated"] is True
    assert job["metrics"]["resumed_from"] >= CHECKPOINT_EVERY, job  # from the checkpoint, not from scratch
    assert job["metrics"]["step"] == STEPS
    answer = client.post("/v1/classify", json={"images": [png_b64("red")], "labels": ["red", "green"]})
    assert answer.status_code == 200 and answer.json()["model_version"] == 2, answer.text
    assert fs.get_file_info(f"{store.removeprefix('s3://')}/uploads/{task_id}").type == pafs.FileType.NotFound
    assert not [p.name for p in scratch.iterdir() if task_id in p.name], "the job's scratch is removed when it ends"
    return second


def lose_the_trainer_node_mid_search(cluster: LocalCluster, client: httpx.Client, seaweedfs, store: str,
                                     tmp_path: Path, trainer: Node) -> None:
    """A search's trial trains where the `trainer` resource is (the head's one CPU is the classifier's,
    so the trial itself runs there too), from the data and the version it fetches from the store.
    The node dies while the trial learns its second task: Tune restarts the trial on the replacement
    node from the checkpoint it reported after the first task, which is not learned again."""
    started = time.monotonic()
    request = {"tasks": ["digits"], "trials": 1, "searcher": "random", "max_train_per_class": 5,
               "config": {"steps": 2, "batch_size": 8, "warmup_steps": 1, "ref_batch_size": 8, "stats_augment": False}}
    response = client.post("/v1/tune", data={"request": json.dumps(request)}, files={
        "dataset": ("rg.zip", colour_zip(tmp_path, ["red", "green"], n_train=6), "application/zip")})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    search = poll_search(cluster, client, job_id, lambda s: s["trials"] and s["trials"][0]["tasks_done"] >= 1)
    cluster.kill_node(trainer)
    print(f"trainer node killed after search {search['trials']}", flush=True)
    assert [t["tasks_done"] for t in client.get(f"/v1/tune/{job_id}").json()["trials"]] == [1], "killed mid-search"
    cluster.add_node("trainer-3", num_cpus=2, resources=TRAINER)

    search = poll_search(cluster, client, job_id, lambda s: s["status"] in ("succeeded", "failed", "cancelled"))
    assert search["status"] == "succeeded", with_log(search, cluster)
    assert [(t["status"], t["tasks_done"]) for t in search["trials"]] == [("complete", 2)], search
    assert search["request"]["worker_resources"] == TRAINER and search["best"] is not None
    fs, folder = seaweedfs.filesystem(), f"{store.removeprefix('s3://')}/tune/{job_id}"
    with fs.open_input_stream(f"{folder}/best.json") as stream:
        assert json.loads(stream.read()) == search["best"]["config"]
    experiment = f"{folder}/ray/tune-{job_id}"
    [trial] = [i.path for i in fs.get_file_info(pafs.FileSelector(experiment)) if i.type == pafs.FileType.Directory]
    with fs.open_input_stream(f"{trial}/result.json") as stream:
        results = [json.loads(line) for line in stream.read().decode().splitlines()]
    assert [r["tasks_done"] for r in results] == [1, 2], "the first task was learned once"
    assert results[-1]["iterations_since_restore"] == 1, "the trial restarted from its checkpoint after task 1"
    with fs.open_input_stream(f"{trial}/error.txt") as stream:
        failures = stream.read().decode()
    assert failures.count("Failure #") == 1, failures  # one retry: the node's loss
    print(f"search that lost its trainer node: {time.monotonic() - started:.0f} s", flush=True)


def with_log(record: dict, cluster: LocalCluster) -> str:
    """A failure message with the record and the end of `gnsp serve`'s log, as text (pytest shortens a
    tuple's repr, and the cluster's logs are gone once the test ends)."""
    return f"{json.dumps(record, indent=1)}\n--- the end of gnsp serve's log ---\n{cluster.log('serve')}"


def poll_search(cluster: LocalCluster, client: httpx.Client, job_id: str, until: Callable[[dict], bool],
                timeout: float = 300) -> dict:
    """GET /v1/tune/{job_id} until `until(search)`; the search must not end before that unless `until` says so."""
    deadline = time.monotonic() + timeout
    while not until(search := client.get(f"/v1/tune/{job_id}").json()):
        assert search["status"] in ("queued", "running") and time.monotonic() < deadline, with_log(search, cluster)
        time.sleep(0.5)
    return search
