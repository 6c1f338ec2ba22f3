"""The JobRunner deployment's event loop keeps serving while the store is slow, a load check is
in flight or a cancel waits for its job: every method only awaits. The class runs here on a plain
asyncio loop (as Serve runs it, async constructor included), with a fake classifier handle whose
answers can only be awaited (they have no `.result()`) and a fake trainer."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable

import pytest

from service.jobs import runner as runner_module
from service.jobs.runner import JobRunner
from service.settings import ServiceSettings
from test_jobs import FakeRunner, store  # noqa: F401 (fixture)

SLOW_S = 0.5
MAX_LAG_S = 0.25


class AwaitOnly:
    """A deployment call's answer that can only be awaited."""

    def __init__(self, result: Awaitable[Any]) -> None:
        self._result = result

    def __await__(self):
        return self._result.__await__()


class FakeClassifier:
    def __init__(self) -> None:
        self.checked: list[int] = []
        self.check_version = self

    def options(self, multiplexed_model_id: str) -> "FakeClassifier":
        return self

    def remote(self, version: int) -> AwaitOnly:
        async def check() -> dict[str, Any]:
            await asyncio.sleep(SLOW_S)
            self.checked.append(version)
            return {"version": version}

        return AwaitOnly(check())


async def start_runner(store, tmp_path, **settings: Any) -> tuple[Any, FakeRunner, FakeClassifier]:
    cls, classifier = JobRunner.func_or_class, FakeClassifier()
    deployment = cls.__new__(cls)  # as Serve builds a replica: an async constructor, awaited
    await deployment.__init__(ServiceSettings(store=store.uri, work_dir=str(tmp_path), prime_node=False, **settings),
                              classifier)
    trainer = FakeRunner(deployment.store, tmp_path, hold=True)
    deployment.queue.runner = trainer
    return deployment, trainer, classifier


async def with_lag(call: Awaitable[Any]) -> tuple[Any, float]:
    """The call's result and the longest the loop was kept from a 10 ms heartbeat meanwhile."""
    loop, lags, done = asyncio.get_running_loop(), [0.0], asyncio.Event()

    async def heartbeat() -> None:
        while not done.is_set():
            started = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - started - 0.01)

    beat = asyncio.create_task(heartbeat())
    try:
        return await call, max(lags)
    finally:
        done.set()
        await beat


def slow_store_writes(deployment) -> None:
    original = deployment.store.save_job

    def save_job(record: dict[str, Any]) -> None:
        time.sleep(SLOW_S)
        original(record)

    deployment.store.save_job = save_job


def upload(deployment, tmp_path, task_id: str) -> str:
    archive = tmp_path / f"{task_id}.zip"
    archive.write_bytes(b"zip")
    return deployment.store.put_upload(task_id, archive, "dataset.zip")


async def until_status(deployment, task_id: str, status: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (view := await deployment.get(task_id))["status"] != status:
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.02)
    return view


def test_slow_store_writes_and_load_checks_never_block_the_loop(store, tmp_path):
    async def scenario() -> None:
        deployment, trainer, classifier = await start_runner(store, tmp_path)
        try:
            slow_store_writes(deployment)
            record, lag = await with_lag(deployment.submit("task-a", "a", "finetune", {"steps": 1},
                                                           upload(deployment, tmp_path, "task-a"), {}))
            assert record["status"] == "queued" and lag < MAX_LAG_S
            await until_status(deployment, "task-a", "running")
            counts, lag = await with_lag(asyncio.gather(deployment.counts(), deployment.list(), deployment.get("task-a")))
            assert counts[0]["running"] == 1 and lag < MAX_LAG_S
            trainer.release.set()  # the job ends: its version is load-checked on the loop, from the worker thread
            view, lag = await with_lag(until_status(deployment, "task-a", "succeeded"))
            assert view["activated"] and classifier.checked == [2] and lag < MAX_LAG_S
            pointer, lag = await with_lag(deployment.activate(1, "rollback"))
            assert pointer["version"] == 1 and classifier.checked == [2, 1] and lag < MAX_LAG_S
        finally:
            deployment.__del__()  # the queues, and the lease's keeper thread, which would outlive the test

    asyncio.run(scenario())


@pytest.mark.parametrize("trainer_stops", [True, False], ids=["stops", "ignores-the-cancel"])
def test_cancel_answers_within_its_bound_without_blocking(store, tmp_path, monkeypatch, trainer_stops):
    monkeypatch.setattr(runner_module, "CANCEL_WAIT_S", 1.0)

    async def scenario() -> None:
        deployment, trainer, _ = await start_runner(store, tmp_path)
        if not trainer_stops:  # a trainer that only notices the cancel once released
            trainer.__class__ = type("Deaf", (FakeRunner,), {"__call__": deaf_call})
        try:
            await deployment.submit("task-a", "a", "finetune", {}, upload(deployment, tmp_path, "task-a"), {})
            await until_status(deployment, "task-a", "running")
            started = time.monotonic()
            view, lag = await with_lag(deployment.cancel("task-a"))
            took = time.monotonic() - started
            assert lag < MAX_LAG_S
            if trainer_stops:
                assert view["status"] == "cancelled" and took < 1.0
            else:
                assert view["status"] == "running" and view["cancel_requested"] and 0.9 < took < 2.0
                trainer.release.set()
                await until_status(deployment, "task-a", "cancelled")
        finally:
            trainer.release.set()
            deployment.__del__()  # the queues, and the lease's keeper thread, which would outlive the test

    asyncio.run(scenario())


def deaf_call(self, record, should_stop, report):
    self.release.wait(20)
    return FakeRunner.__call__(self, record, should_stop, report)


def test_the_load_check_refuses_to_run_on_the_loop(store, tmp_path):
    async def scenario() -> None:
        deployment, _, _ = await start_runner(store, tmp_path)
        try:
            with pytest.raises(RuntimeError, match="from a thread"):
                deployment._check_version(1)  # it would wait for the loop it blocks
        finally:
            deployment.__del__()  # the queues, and the lease's keeper thread, which would outlive the test

    asyncio.run(scenario())


def test_a_job_runner_touches_no_ray_until_a_job_runs_and_leaves_no_thread(store, tmp_path, monkeypatch):
    """Building the queue never starts a Ray (a process without one would start its own, dashboard
    and all), and an orderly shutdown stops the lease's keeper, which would otherwise take the lease
    again later and build a queue in a process whose Ray has gone."""
    import threading

    import ray

    monkeypatch.setattr(ray, "get_runtime_context", lambda: pytest.fail("the job runner reached for Ray"))

    async def scenario() -> None:
        deployment, _, _ = await start_runner(store, tmp_path)
        assert (await deployment.role())["role"] == "writer"
        deployment.__del__()

    asyncio.run(scenario())
    assert not [t for t in threading.enumerate() if t.name == "gnsp-store-lease"]
