"""The job queue when things go wrong around a job: store writes that fail, errors nobody planned
for, and a cancel that lands after the job published its version. Every job must end (never
`running` or `queued` forever), and the jobs behind it must still run."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from service.jobs import queue as queue_module
from service.jobs.queue import WorkQueue
from service.jobs.tasks import RUNNER_FILE, AttemptOutcome, JobCancelled
from test_jobs import FakeRunner, make_queue, store, stored_job, submit, until  # noqa: F401 (fixture)
from test_store import fake_state


def failing_when(store, method: str, should_fail, error: Exception | None = None) -> list[Any]:
    """Make `store.<method>` raise while `should_fail(*args)` says so; returns the calls that failed."""
    original, failed = getattr(store, method), []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if should_fail(*args):
            failed.append(args)
            raise error or OSError("store unreachable: connection reset")
        return original(*args, **kwargs)

    setattr(store, method, wrapper)
    return failed


def ended(queue, task_id: str) -> dict:
    return until(lambda: queue.view(task_id)["status"] in ("succeeded", "failed", "cancelled") and queue.view(task_id))


def test_a_failed_end_write_marks_the_job_failed_and_later_jobs_run(store, tmp_path):
    failed = failing_when(store, "save_job", lambda r: r["task_id"] == "task-a" and r["status"] == "succeeded")
    queue = make_queue(store, FakeRunner(store, tmp_path))
    first = ended(queue, submit(queue, store, "task-a", tmp_path)["task_id"])
    second = ended(queue, submit(queue, store, "task-b", tmp_path)["task_id"])
    queue.stop()
    assert failed, "the end write was never attempted"
    assert first["status"] == "failed" and "could not record this job's end" in first["error"]
    assert first["model_version"] == 2  # what the job did is still shown
    assert stored_job(store, "task-a")["status"] == "failed"  # the second, failed-record write went through
    assert second["status"] == "succeeded" and second["model_version"] == 3


def test_a_store_that_refuses_every_write_still_ends_the_job(store, tmp_path):
    queue = make_queue(store, FakeRunner(store, tmp_path))
    failing_when(store, "save_job", lambda r: r["task_id"] == "task-a" and r["status"] != "queued")
    record = ended(queue, submit(queue, store, "task-a", tmp_path)["task_id"])
    queue.stop()
    assert record["status"] == "failed" and "see the service log" in record["error"]
    assert stored_job(store, "task-a")["status"] == "queued"  # the store never took a write after the submit
    assert store.versions() == [1]  # it failed before training: the start could not be recorded


def test_a_failed_version_record_fails_the_job_with_its_version(store, tmp_path):
    failing_when(store, "save_job", lambda r: r["status"] == "running" and r.get("model_version") is not None)
    queue = make_queue(store, FakeRunner(store, tmp_path))
    record = ended(queue, submit(queue, store, "task-a", tmp_path)["task_id"])
    queue.stop()
    assert record["status"] == "failed" and record["model_version"] == 2 and "version 2" in record["error"]
    assert store.active() == 1 and stored_job(store, "task-a")["model_version"] == 2


def test_unexpected_errors_fail_only_their_job(store, tmp_path):
    runner = FakeRunner(store, tmp_path)
    runner.error = KeyError("internal bookkeeping")
    owner_check_fails = threading.Event()
    failing_when(store, "read_json", lambda rel: rel == RUNNER_FILE and owner_check_fails.is_set())
    queue = make_queue(store, runner)
    first = ended(queue, submit(queue, store, "task-a", tmp_path)["task_id"])
    owner_check_fails.set()  # the worker's own store read fails, outside any job's attempt
    second = ended(queue, submit(queue, store, "task-b", tmp_path)["task_id"])
    owner_check_fails.clear()
    runner.error = None
    third = ended(queue, submit(queue, store, "task-c", tmp_path)["task_id"])
    queue.stop()
    assert first["status"] == "failed" and first["error"] == "internal error (KeyError); see the service log"
    assert second["status"] == "failed" and second["error"] == "internal error (OSError); see the service log"
    assert stored_job(store, "task-b")["status"] == "failed"
    assert third["status"] == "succeeded" and store.versions() == [1, 2]


class PublishThenWait(FakeRunner):
    """Publishes its version, then waits for the test's cancel before it returns (or is killed)."""

    def __init__(self, *args: Any, killed: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.published, self.returns, self.killed = threading.Event(), threading.Event(), killed

    def __call__(self, record, should_stop, report) -> AttemptOutcome:
        state = fake_state(self.tmp / record["task_id"], record["task_id"])
        version = self.store.publish_version(state, {"task_id": record["task_id"], "parent": record["base_version"],
                                                     "metrics": {"heldout_accuracy": 41.0}})
        self.published.set()
        self.returns.wait(10)
        if self.killed:  # the cancel stopped the attempt after it had published
            raise JobCancelled()
        return AttemptOutcome(version, {"heldout_accuracy": 41.0}, {"passed": True})


@pytest.mark.parametrize("killed", [False, True], ids=["returned", "killed-after-publishing"])
def test_a_version_published_while_a_cancel_lands_is_recorded(store, tmp_path, killed):
    runner = PublishThenWait(store, tmp_path, killed=killed)
    queue = make_queue(store, runner)
    task_id = submit(queue, store, "task-a", tmp_path)["task_id"]
    assert runner.published.wait(10)
    assert queue.cancel(task_id)["cancel_requested"] is True
    runner.returns.set()
    record = ended(queue, task_id)
    queue.stop()
    assert record["status"] == "cancelled" and record["model_version"] == 2 and record["activated"] is False
    assert record["metrics"]["heldout_accuracy"] == 41.0
    assert "POST /v1/models/2/activate" in record["note"]
    assert store.active() == 1 and store.versions() == [1, 2]
    assert {k: stored_job(store, task_id)[k] for k in ("status", "model_version")} == {
        "status": "cancelled", "model_version": 2}


def test_the_work_queue_survives_any_error_and_reports_it():
    done, errors = [], []

    def handler(job_id: str) -> bool:
        if job_id == "a":
            raise SystemExit("a job must not stop the worker")
        if job_id == "b":
            raise RuntimeError("boom")
        done.append(job_id)
        return True

    def on_error(job_id: str, error: BaseException) -> None:
        errors.append((job_id, type(error).__name__))
        if job_id == "b":
            raise OSError("the error handler fails too")

    queue = WorkQueue("test", handler, on_error=on_error)
    queue.start()
    for job_id in "abc":
        queue.put(job_id)
    until(lambda: done == ["c"])
    queue.stop()
    assert errors == [("a", "SystemExit"), ("b", "RuntimeError")]


def test_a_stop_while_another_thread_starts_the_queue_waits_for_the_started_worker(monkeypatch):
    """A service can be promoted to writer (its lease's keeper thread starts the queues) while it
    shuts down: stop must never see a worker thread that exists but has not started yet."""

    class SlowToStart(threading.Thread):
        def start(self) -> None:
            time.sleep(0.5)  # the window between making the worker thread and starting it
            super().start()

    queue = WorkQueue("test", lambda job_id: True)
    starter = threading.Thread(target=queue.start)
    monkeypatch.setattr(queue_module.threading, "Thread", SlowToStart)  # the queue's own worker thread
    starter.start()
    time.sleep(0.1)
    queue.stop(timeout=5)  # the old code: RuntimeError("cannot join thread before it is started")
    starter.join()
    assert queue._thread is not None and not queue._thread.is_alive()

    stopped = WorkQueue("stopped first", lambda job_id: True)
    stopped.stop()
    stopped.start()
    assert stopped._thread is None  # a stopped queue never starts
