"""POST /v1/tune over real HTTP: a tiny search on an uploaded dataset, its table and best config,
the best config becoming the default of later tasks, cancelling, and bad requests. The store is an
object store (SeaweedFS): a search keeps all of itself there and nothing on the service's node."""

from __future__ import annotations

import json
import time

import httpx
import pyarrow.fs as pafs
import pytest

from service.training.stored import frozen_outputs_folder
from service_support import (alive_train_controllers, colour_zip, live_placement_groups, running_service,
                             service_settings, wait_gone, wait_released)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
SEARCH_CONFIG = {"steps": 2, "batch_size": 8, "warmup_steps": 1, "ref_batch_size": 8, "stats_augment": False,
                 "lr": 1e-3}


@pytest.fixture(scope="module")
def service(ray_session, seaweedfs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune-api")
    store = seaweedfs.uri()
    with pytest.MonkeyPatch.context() as env:
        for name, value in seaweedfs.env().items():
            env.setenv(name, value)
        with running_service(service_settings(tmp, store=store, work_dir=str(tmp / "work")), "gnsp-tune-api") as client:
            yield client, tmp, store, seaweedfs


def submit(client: httpx.Client, tmp, request: dict, colours: list[str] | None = None) -> httpx.Response:
    if colours is None:
        return client.post("/v1/tune", json=request)
    return client.post("/v1/tune", data={"request": json.dumps(request)},
                       files={"dataset": ("d.zip", colour_zip(tmp, colours), "application/zip")})


def wait_search(client: httpx.Client, job_id: str, timeout: float = 400) -> list[dict]:
    """Poll until the search ends; returns every view seen."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(client.get(f"/v1/tune/{job_id}").json())
        if seen[-1]["status"] in ("succeeded", "failed", "cancelled"):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"search {job_id} did not end: {seen[-1]}")


def test_search_on_an_upload_then_its_best_config_is_the_default(service):
    client, tmp, store, seaweedfs = service
    request = {"trials": 3, "config": SEARCH_CONFIG, "searcher": "random", "max_concurrent": 1, "apply_best": True,
               "space": {"threshold": [0.01, 0.5], "lr": [1e-5, 3e-3]}}
    response = submit(client, tmp, request, ["red", "green", "blue"])
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert response.json()["status"] == "queued" and response.json()["request"]["trials"] == 3

    seen = wait_search(client, job_id)
    final = seen[-1]
    assert final["status"] == "succeeded", final
    progress = [v["progress"] for v in seen]
    assert progress == sorted(progress) and final["progress"] == 1.0
    assert len(final["trials"]) == 3 and {t["status"] for t in final["trials"]} == {"complete"}
    objectives = [t["objective"] for t in final["trials"]]
    assert final["best"]["objective"] == max(objectives)
    assert final["applied"] and "base_state" not in final["request"]  # no server paths in the view
    assert final["request"]["base_version"] == 1  # the trials fetched the version themselves
    assert_kept_in_the_store(seaweedfs, f"{store.removeprefix('s3://')}/tune/{job_id}", final)
    node_cache = frozen_outputs_folder(str(tmp / "work"))  # the node's, primed before any job: not the search's
    left = [p for p in (tmp / "work").rglob("*") if p.is_file() and node_cache not in p.parents]
    assert not left, left  # scratch only: nothing of the search stays on the service's node

    listing = client.get("/v1/tune").json()
    assert [s["job_id"] for s in listing["searches"]] == [job_id]
    defaults = listing["defaults"]
    assert defaults["source"] == job_id and defaults["config"]["method"] == "gnsp"
    assert defaults["config"] == final["best"]["config"] and defaults["config"]["projection"]["threshold"] == pytest.approx(
        final["best"]["metrics"]["threshold"])

    task = client.post("/v1/tasks", data={"name": "rg", "method": "gnsp", "config": json.dumps({"steps": 2})},
                       files={"dataset": ("rg.zip", colour_zip(tmp, ["red", "green"]), "application/zip")})
    assert task.status_code == 202, task.text
    record = client.get(f"/v1/tasks/{task.json()['task_id']}").json()
    assert record["config"]["steps"] == 2  # the task's own setting wins over the default
    assert record["config"]["projection"]["threshold"] == defaults["config"]["projection"]["threshold"]
    assert record["config"]["lr"] == defaults["config"]["lr"]
    client.delete(f"/v1/tasks/{task.json()['task_id']}")


def assert_kept_in_the_store(seaweedfs, root: str, final: dict) -> None:
    """The search's records, data and Tune experiment are in the bucket; its trial states are gone."""
    fs = seaweedfs.filesystem()
    kept = {info.path[len(root) + 1:] for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if info.type == pafs.FileType.File}
    records = {"request.json", "status.json", "job.json", "trials.json", "trials.md", "objective_vs_threshold.png",
               "best.json", "best_trial.json", "dataset/dataset.zip", "data/validation.json", "data/0/dataset.zip"}
    assert records <= kept, sorted(kept)
    assert any(name.startswith(f"ray/tune-{final['job_id']}/") for name in kept)  # the Tune experiment
    assert not any(name.startswith("work/") for name in kept)  # trial states, dropped once every trial finished
    with fs.open_input_stream(f"{root}/best.json") as stream:
        assert json.loads(stream.read()) == final["best"]["config"]


@pytest.mark.parametrize("when", ["at once", "while a trial trains"])
def test_a_cancelled_search_ends_cancelled_and_releases_what_it_held(service, when):
    """Cancelled before its trials start or while one trains (then its process goes with the search,
    and Ray Train's controller with it): either way nothing of the search keeps the cluster's CPUs."""
    client, tmp = service[:2]
    before, controllers = live_placement_groups(), alive_train_controllers()
    response = submit(client, tmp, {"tasks": ["digits"], "trials": 6, "max_train_per_class": 2,
                                    "config": {**SEARCH_CONFIG, "steps": 500}})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 120
    while when != "at once" and not alive_train_controllers() - controllers:
        assert time.monotonic() < deadline, "no trial started training"
        time.sleep(0.2)
    cancelled = client.delete(f"/v1/tune/{job_id}")  # answers once it ended, or after a few seconds
    assert cancelled.status_code == 200 and cancelled.json()["cancelled"] is True, cancelled.text
    final = wait_search(client, job_id)[-1]
    assert final["status"] == "cancelled", final
    wait_released(before, f"the search cancelled {when}")
    wait_gone(controllers, "a cancelled trial's Ray Train controller")
    again = client.delete(f"/v1/tune/{job_id}")
    assert again.status_code == 409 and "already ended" in again.json()["error"]["message"]
    assert client.post(f"/v1/tune/{job_id}/apply").status_code == 409
    assert [s["job_id"] for s in client.get("/v1/tune").json()["searches"]][-1] == job_id


def test_bad_search_requests(service):
    client = service[0]

    bad = [
        ({"tasks": ["/etc"]}, 400, "never reads paths"),
        ({"tasks": []}, 400, "needs tasks"),
        ({"tasks": ["digits"], "out_dir": "/tmp/x"}, 422, "out_dir"),
        ({"tasks": ["digits"], "trials": 0}, 422, "trials"),
        ({"tasks": ["digits"], "config": {"method": "finetune"}}, 422, "config.method"),
        ({"tasks": ["digits"], "config": {"stepz": 3}}, 422, "config.stepz"),
        ({"tasks": ["digits"], "config": {"trainable": "(a+)+$"}}, 422, "config.trainable"),
        ({"tasks": ["digits"], "space": {"threshold": [0.5, 2]}}, 422, "straddle 1"),
        ({"tasks": ["digits"], "base_version": 99}, 404, "99"),
    ]
    for body, status, words in bad:
        response = client.post("/v1/tune", json=body)
        assert response.status_code == status and words in response.json()["error"]["message"], (body, response.text)
    garbage = client.post("/v1/tune", content=b"{not json", headers={"content-type": "application/json"})
    assert garbage.status_code == 400 and "not valid JSON" in garbage.json()["error"]["message"]
    assert client.get("/v1/tune/tune-20250101-120000-abcdef").status_code == 404
    assert client.get("/v1/tune/tune-nope").status_code == 422  # not a search id
    assert client.delete("/v1/tune/../../etc").status_code == 404

