"""The job queue: one job at a time in submission order, cancellation, the quality gate, activation,
recovery after a restart. A fake runner stands in for Ray Train here; test_service_e2e.py runs
the real one (and checks that cancelling a running job frees its training workers)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from gnsp_core.errors import DatasetError
from service.errors import ConflictError, UnknownTaskError, UnknownVersionError, VersionLoadError
from service.jobs.tasks import AttemptOutcome, JobCancelled, JobInterrupted, JobQueue
from service.settings import ServiceSettings
from service.store import ModelStore
from test_store import fake_state


def stored_job(store: ModelStore, task_id: str) -> dict:
    """The job record as persisted in the store (what a restarted service would read)."""
    return {r["task_id"]: r for r in store.jobs()}[task_id]


def until(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll `condition` until it is truthy (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
    return value


class FakeRunner:
    """Stands in for Ray Train: publishes a fake version, or waits until released or stopped."""

    def __init__(self, store: ModelStore, tmp: Path, hold: bool = False) -> None:
        self.store, self.tmp = store, tmp
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.calls: list[tuple[str, int]] = []
        self.running = self.max_running = 0
        self.gate: dict[str, Any] = {"passed": True}
        self.gates: dict[str, dict[str, Any]] = {}
        """Per task id: the gate of that job (else `gate`)."""
        self.error: Exception | None = None
        self._lock = threading.Lock()

    def __call__(self, record, should_stop, report) -> AttemptOutcome:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.calls.append((record["task_id"], record["base_version"]))
        try:
            report(0.5, "train")
            while not self.release.wait(0.02):
                if should_stop() == "cancel":
                    raise JobCancelled()
                if should_stop() == "stop":
                    raise JobInterrupted()
            if self.error is not None:
                raise self.error
            state = fake_state(self.tmp / record["task_id"], record["task_id"])
            gate = self.gates.get(record["task_id"], self.gate)
            parent = self.store.manifest(record["base_version"])
            manifest = {"task_id": record["task_id"], "parent": record["base_version"], "gate": gate,
                        "tasks": [*parent.get("tasks", []), record["name"]]}  # as the real attempt writes it
            version = self.store.publish_version(state, manifest)
            return AttemptOutcome(version, {"heldout_accuracy": 40.0}, gate)
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture()
def store(tmp_path) -> ModelStore:
    store = ModelStore.open(str(tmp_path / "store"))
    store.publish_version(fake_state(tmp_path / "base", "base"), {"tasks": []})
    store.set_active(1, "base model")
    return store


def make_queue(store: ModelStore, runner: FakeRunner, check: Callable[[int], Any] = lambda v: None,
               **settings: Any) -> JobQueue:
    queue = JobQueue(store, ServiceSettings(store=store.uri, **settings), runner, check)
    queue.recover()
    queue.start()
    return queue


def submit(queue: JobQueue, store: ModelStore, task_id: str, tmp: Path, base_version: int | None = None) -> dict:
    archive = tmp / f"{task_id}.zip"
    archive.write_bytes(b"zip")
    upload = store.put_upload(task_id, archive, "dataset.zip")
    return queue.submit(task_id, task_id, "finetune", {"steps": 1}, upload, base_version=base_version)


def test_concurrent_submissions_run_one_at_a_time_in_order(store, tmp_path):
    runner = FakeRunner(store, tmp_path, hold=True)
    queue = make_queue(store, runner)
    threads = [threading.Thread(target=submit, args=(queue, store, f"task-{i}", tmp_path)) for i in range(4)]
    for thread in threads:  # four uploads at once
        thread.start()
    for thread in threads:
        thread.join()
    ids = [r["task_id"] for r in queue.list()]  # submission order
    until(lambda: runner.calls)
    assert [r["status"] for r in queue.list()].count("running") == 1
    runner.release.set()
    until(lambda: all(r["status"] == "succeeded" for r in queue.list()))
    queue.stop()
    assert runner.max_running == 1
    assert [task for task, _ in runner.calls] == ids
    assert [base for _, base in runner.calls] == [1, 2, 3, 4]  # each trained from the version before it
    assert store.active() == 5 and store.versions() == [1, 2, 3, 4, 5]
    assert [store.manifest(v)["parent"] for v in (2, 3, 4, 5)] == [1, 2, 3, 4]
    assert [r["model_version"] for r in queue.list()] == [2, 3, 4, 5] and store.upload_ids() == []


def test_cancel_queued_never_runs_and_cancel_running_stops(store, tmp_path):
    runner = FakeRunner(store, tmp_path, hold=True)
    queue = make_queue(store, runner)
    running = submit(queue, store, "task-a", tmp_path)["task_id"]
    queued = submit(queue, store, "task-b", tmp_path)["task_id"]
    until(lambda: queue.view(running)["progress"] == 0.5)  # live progress from the runner
    assert queue.cancel(queued)["status"] == "cancelled"
    cancelling = queue.cancel(running)  # asks the trainer to stop; never waits for it
    assert cancelling["status"] == "running" and cancelling["cancel_requested"] is True
    assert until(lambda: queue.view(running)["status"] == "cancelled")
    with pytest.raises(ConflictError):
        queue.cancel(running)
    with pytest.raises(UnknownTaskError):
        queue.cancel("task-zzz")
    queue.stop()
    assert [task for task, _ in runner.calls] == [running]
    assert store.versions() == [1] and store.active() == 1 and store.upload_ids() == []
    assert stored_job(store, queued)["error"] == "cancelled before it started"


def test_quality_gate_failure_keeps_version_but_not_active(store, tmp_path):
    runner = FakeRunner(store, tmp_path)
    runner.gate = {"passed": False, "heldout_accuracy": 40.0, "base_heldout_accuracy": 55.5, "base_version": 1,
                   "max_drop": 2.0}
    queue = make_queue(store, runner)
    task_id = submit(queue, store, "task-a", tmp_path)["task_id"]
    record = until(lambda: queue.view(task_id)["status"] in ("failed", "succeeded") and queue.view(task_id))
    queue.stop()
    assert record["status"] == "failed" and record["model_version"] == 2
    assert "40.00%" in record["error"] and "55.50%" in record["error"] and "not activated" in record["error"]
    assert store.versions() == [1, 2] and store.active() == 1


def test_failed_load_check_leaves_the_old_version_active(store, tmp_path):
    def check(version: int) -> None:
        raise VersionLoadError(f"model version {version} failed to load: corrupt weights")

    queue = make_queue(store, FakeRunner(store, tmp_path), check=check)
    task_id = submit(queue, store, "task-a", tmp_path)["task_id"]
    record = until(lambda: queue.view(task_id)["status"] == "failed" and queue.view(task_id))
    assert "failed its load check" in record["error"] and store.active() == 1
    with pytest.raises(VersionLoadError):
        queue.activate(2, "manual")
    assert store.active() == 1
    queue.stop()


def test_manual_activation_and_rollback(store, tmp_path):
    checked = []
    queue = make_queue(store, FakeRunner(store, tmp_path), check=checked.append, activation="manual")
    task_id = submit(queue, store, "task-a", tmp_path)["task_id"]
    record = until(lambda: queue.view(task_id)["status"] == "succeeded" and queue.view(task_id))
    assert record["model_version"] == 2 and not record["activated"] and store.active() == 1
    assert queue.activate(2, "pin")["version"] == 2 and checked == [2]
    assert queue.activate(1, "rollback")["version"] == 1 and checked == [2, 1]
    with pytest.raises(UnknownVersionError):
        queue.activate(5, "nope")
    queue.stop()
    assert [h["reason"] for h in store.pointer()["history"]] == ["base model", "pin", "rollback"]


def test_manual_activation_chains_jobs_from_the_newest_version_that_passed_the_gate(store, tmp_path):
    """Nothing is activated, yet each version holds every task before it; a version that failed the
    gate is skipped, so the next job trains from the one before it."""
    runner = FakeRunner(store, tmp_path)
    runner.gates["task-c"] = {"passed": False, "heldout_accuracy": 10.0, "base_heldout_accuracy": 50.0,
                              "base_version": 3, "max_drop": 2.0}
    queue = make_queue(store, runner, activation="manual")
    for task_id in ("task-a", "task-b", "task-c", "task-d"):
        submit(queue, store, task_id, tmp_path)
    until(lambda: all(r["status"] in ("succeeded", "failed") for r in queue.list()))
    queue.stop()
    assert runner.calls == [("task-a", 1), ("task-b", 2), ("task-c", 3), ("task-d", 3)]
    assert [r["status"] for r in queue.list()] == ["succeeded", "succeeded", "failed", "succeeded"]
    assert store.active() == 1  # manual: the pointer never moved
    assert store.manifest(3)["tasks"] == ["task-a", "task-b"] and store.manifest(5)["tasks"] == ["task-a", "task-b", "task-d"]
    assert stored_job(store, "task-d")["base_version"] == 3


def test_a_job_trains_from_the_base_version_its_caller_named(store, tmp_path):
    runner = FakeRunner(store, tmp_path)
    queue = make_queue(store, runner)  # activation auto
    submit(queue, store, "task-a", tmp_path)
    until(lambda: queue.view("task-a")["status"] == "succeeded")
    assert store.active() == 2
    queued = submit(queue, store, "task-b", tmp_path, base_version=1)
    assert queued["base_version"] == 1  # shown from the start
    record = until(lambda: queue.view("task-b")["status"] == "succeeded" and queue.view("task-b"))
    queue.stop()
    assert runner.calls[-1] == ("task-b", 1) and store.manifest(3)["tasks"] == ["task-b"]
    assert not record["activated"] and store.active() == 2  # a branch off an older version is not activated
    assert "trained from version 1, not the active version 2" in record["note"]


def test_versions_of_jobs_that_did_not_succeed_never_head_the_chain(store, tmp_path):
    from service.jobs.lineage import chain_base, newest_passed, unsucceeded_versions

    for name in ("a", "b", "c"):
        store.publish_version(fake_state(tmp_path / name, name), {"gate": {"passed": name != "c"}})
    records = [{"status": "cancelled", "model_version": 3}, {"status": "succeeded", "model_version": 2},
               {"status": "failed", "model_version": None}]
    assert unsucceeded_versions(records) == {3}
    assert newest_passed(store) == 3 and newest_passed(store, {3}) == 2  # 4 failed its gate
    assert chain_base(store, "manual", records) == 2 and chain_base(store, "auto", records) == store.active() == 1


def test_user_errors_fail_the_job_with_their_message(store, tmp_path):
    runner = FakeRunner(store, tmp_path)
    runner.error = DatasetError("class folder cat has no images")
    queue = make_queue(store, runner)
    task_id = submit(queue, store, "task-a", tmp_path)["task_id"]
    record = until(lambda: queue.view(task_id)["status"] == "failed" and queue.view(task_id))
    queue.stop()
    assert record["error"] == "class folder cat has no images" and store.versions() == [1]


def test_a_stopped_queue_closes_its_runner_once_the_running_job_ended(store, tmp_path):
    """What a runner holds between jobs (the attempt host's process) goes when its queue stops (a
    service turned standby, or shutting down), and only after the running attempt has ended."""
    runner = FakeRunner(store, tmp_path, hold=True)
    closed: list[int] = []
    runner.close = lambda: closed.append(runner.running)
    queue = make_queue(store, runner)
    submit(queue, store, "task-a", tmp_path)
    until(lambda: runner.calls)
    assert closed == []
    queue.stop()
    assert closed == [0]  # once, with no attempt running


@pytest.mark.parametrize("on_restart", ["resume", "fail"])
def test_restart_resumes_or_fails_interrupted_jobs_and_requeues_the_rest(store, tmp_path, on_restart):
    runner = FakeRunner(store, tmp_path, hold=True)
    queue = make_queue(store, runner)
    first = submit(queue, store, "task-a", tmp_path)["task_id"]
    second = submit(queue, store, "task-b", tmp_path)["task_id"]
    until(lambda: runner.calls)
    queue.stop()  # what a shutdown (or a crash) leaves: one job running, one queued
    assert stored_job(store, first)["status"] == "running" and stored_job(store, second)["status"] == "queued"

    runner = FakeRunner(store, tmp_path)
    restarted = make_queue(store, runner, on_restart=on_restart)
    until(lambda: all(r["status"] in ("succeeded", "failed") for r in restarted.list()))
    restarted.stop()
    records = {r["task_id"]: r for r in restarted.list()}
    if on_restart == "resume":
        assert [task for task, _ in runner.calls] == [first, second]
        assert records[first]["status"] == "succeeded" and records[first]["attempts"] == 2
    else:
        assert [task for task, _ in runner.calls] == [second]
        assert records[first]["status"] == "failed" and records[first]["error"].startswith("interrupted")
    assert records[second]["status"] == "succeeded" and store.upload_ids() == []
