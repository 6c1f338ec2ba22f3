"""The search queue when things go wrong around a search: its Ray task cannot start or dies, its
winner cannot be applied, a user cancels it while it runs. Each search ends with a status that
says so and the searches behind it still run. A fake stands in for Ray here (test_service_tune.py
runs real searches)."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import ray.exceptions

from gnsp_core.config import TrainConfig
from service.settings import ServiceSettings
from service.tuning import searches as searches_module
from service.tuning.folder import SearchFolder
from service.tuning.report import BEST_FILE, write_status
from service.tuning.searches import TuneJobs
from test_jobs import store, until  # noqa: F401 (fixture)


def folder_of(request: dict[str, Any]) -> SearchFolder:
    return SearchFolder(request["store"], request["out_dir"])


class FakeBoard:
    """The search's board, as far as the search queue uses it: a stop request."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.request_stop = SimpleNamespace(remote=self.stop.set)


class FakeRef:
    def __init__(self, request: dict[str, Any], behaviour: str, board: FakeBoard) -> None:
        self.request, self.behaviour, self.board = request, behaviour, board


class FakeRay:
    """`_start_search`, the board and the `ray.get` / `ray.kill` the search queue calls, scripted per search."""

    def __init__(self, behaviours: list[str]) -> None:
        self.behaviours, self.started = list(behaviours), []
        self.boards: dict[str, FakeBoard] = {}
        self.killed: list[FakeBoard] = []

    def open_board(self, job_id: str) -> FakeBoard:
        board = self.boards[job_id] = FakeBoard()
        return board

    def remote(self, request: dict[str, Any], resume: bool) -> FakeRef:
        behaviour = self.behaviours.pop(0)
        self.started.append(request["job_id"])
        if behaviour == "cannot start":
            raise ConnectionError("the Ray cluster is unreachable")
        return FakeRef(request, behaviour, self.boards[request["job_id"]])

    def get(self, ref: FakeRef) -> dict[str, Any] | None:
        if ref.behaviour == "dies":  # the process died: no status written by the search itself
            raise ray.exceptions.WorkerCrashedError()
        if ref.behaviour == "runs until cancelled":  # Tune ends the search once its board asks
            write_status(folder_of(ref.request), "running")
            assert ref.board.stop.wait(20)
            write_status(folder_of(ref.request), "cancelled", "stopped on request")
            return None
        if ref.behaviour == "finds a best config":
            folder_of(ref.request).write_text(BEST_FILE, json.dumps(TrainConfig(method="gnsp").to_dict()))
        write_status(folder_of(ref.request), "succeeded")
        return {"method": "gnsp"}  # a best config; without best.json ("succeeds") applying it fails

    def kill(self, board: FakeBoard) -> None:
        self.killed.append(board)


@pytest.fixture()
def searches(store, monkeypatch):
    def make(behaviours: list[str]) -> tuple[TuneJobs, FakeRay]:
        fake = FakeRay(behaviours)
        monkeypatch.setattr(searches_module, "_start_search", fake.remote)
        monkeypatch.setattr(searches_module, "open_board", fake.open_board)
        monkeypatch.setattr(searches_module, "ray", SimpleNamespace(get=fake.get, kill=fake.kill))
        jobs = TuneJobs(store, ServiceSettings(store=store.uri))
        jobs.recover()
        jobs.start()
        made.append(jobs)
        return jobs, fake

    made: list[TuneJobs] = []
    yield make
    for jobs in made:
        jobs.stop()


def submit(jobs: TuneJobs, **extra: Any) -> str:
    return jobs.submit({"tasks": ["digits"], "trials": 2, **extra})["job_id"]


def final(jobs: TuneJobs, job_id: str) -> dict[str, Any]:
    return until(lambda: jobs.view(job_id)["status"] in ("succeeded", "failed", "cancelled") and jobs.view(job_id))


def test_any_error_around_a_search_fails_that_search_and_later_ones_run(searches):
    jobs, fake = searches(["runs until cancelled", "cannot start", "dies", "succeeds", "succeeds"])
    running = submit(jobs)
    until(lambda: jobs.view(running)["status"] == "running")
    cannot_start, dies = submit(jobs), submit(jobs)
    unappliable, last = submit(jobs, apply_best=True), submit(jobs)

    started = time.monotonic()
    cancelling = jobs.cancel(running)
    assert time.monotonic() - started < 2  # asks the search to stop; never waits for it
    assert cancelling["cancelled"] is True

    assert final(jobs, running)["status"] == "cancelled"
    assert final(jobs, running)["error"] == "cancelled by the user"
    failed = final(jobs, cannot_start)
    assert failed["status"] == "failed" and failed["error"] == "internal error (ConnectionError); see the service log"
    assert final(jobs, dies)["status"] == "failed" and "WorkerCrashedError" in jobs.view(dies)["error"]
    assert final(jobs, unappliable)["status"] == "succeeded" and jobs.view(unappliable)["applied"] is False
    assert final(jobs, last)["status"] == "succeeded"
    assert fake.started == [running, cannot_start, dies, unappliable, last]
    assert fake.killed == [fake.boards[j] for j in fake.started]  # every search's board goes with it


def test_a_search_whose_folder_breaks_fails_even_when_its_status_cannot_be_written(searches, monkeypatch):
    jobs, fake = searches(["runs until cancelled", "succeeds"])
    blocker = submit(jobs)
    until(lambda: jobs.view(blocker)["status"] == "running")
    broken, after = submit(jobs), submit(jobs)

    def refuse(out_dir, status, error=None):
        if str(out_dir).endswith(broken):
            raise OSError("disk full")
        return real_write_status(out_dir, status, error)

    real_write_status = searches_module.write_status
    monkeypatch.setattr(searches_module, "write_status", refuse)
    monkeypatch.setattr(jobs, "_started", lambda job_id: 1 / 0 if job_id == broken else False)
    jobs.cancel(blocker)
    record = final(jobs, broken)
    assert record["status"] == "failed" and "could not record this search's end" in record["error"]
    assert final(jobs, after)["status"] == "succeeded"
    assert fake.started == [blocker, after]


def test_a_search_running_when_the_service_stops_is_stopped_then_resumed_on_the_next_start(searches):
    """Stopped through its board, so Tune ends it and removes what it holds, rather than its driver
    dying with the service; the next service resumes it."""
    jobs, fake = searches(["runs until cancelled"])
    job_id = submit(jobs)
    until(lambda: jobs.view(job_id)["status"] == "running")
    jobs.stop()
    assert fake.boards[job_id].stop.is_set() and fake.killed == [fake.boards[job_id]]
    stopped = jobs.view(job_id)
    assert stopped["status"] == "queued" and "resumes on the next start" in stopped["error"], stopped

    restarted, fake = searches(["succeeds"])
    assert final(restarted, job_id)["status"] == "succeeded"
    assert fake.started == [job_id]


def test_a_search_is_shown_ended_only_once_its_end_is_recorded(searches, monkeypatch):
    """The search's task writes `succeeded` before the queue applies its best config: a client
    polling in between sees it still running, never succeeded and not applied."""
    jobs, fake = searches(["finds a best config"])
    applying, proceed = threading.Event(), threading.Event()
    real_apply = jobs.apply

    def slow_apply(job_id: str) -> dict[str, Any]:
        applying.set()
        assert proceed.wait(20)
        return real_apply(job_id)

    monkeypatch.setattr(jobs, "apply", slow_apply)
    job_id = submit(jobs, apply_best=True)
    assert applying.wait(20)
    during = jobs.view(job_id)
    assert during["status"] == "running" and during["progress"] < 1.0 and not during["applied"], during
    proceed.set()
    ended = final(jobs, job_id)
    assert ended["status"] == "succeeded" and ended["progress"] == 1.0 and ended["applied"], ended
