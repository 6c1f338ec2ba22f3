"""Two services on one store (an upgrade's old and new cluster): the job runner that holds the
store's writer lease runs the jobs; the other is standby, runs nothing and writes nothing until the
lease is free, then takes over the job records; versions are never duplicated, overwritten or lost.

The JobRunner class runs here on a plain asyncio loop, as in test_job_runner.py, with a fake trainer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from service.jobs import runner as runner_module
from service.jobs.runner import JobRunner
from service.settings import ServiceSettings
from service.store import LeaseLost
from test_job_runner import FakeClassifier, until_status, upload
from test_jobs import FakeRunner, store  # noqa: F401 (fixture)


async def start_service(store, tmp_path) -> tuple[Any, FakeRunner]:
    """A service's job runner on `store` (as Serve builds it), its trainer fake once it is the writer."""
    cls = JobRunner.func_or_class
    deployment = cls.__new__(cls)
    await deployment.__init__(ServiceSettings(store=store.uri, work_dir=str(tmp_path), prime_node=False), FakeClassifier())
    trainer = FakeRunner(deployment.store, tmp_path, hold=True)
    if deployment.queue is not None:
        deployment.queue.runner = trainer
    return deployment, trainer


async def until_role(deployment, role: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (answer := await deployment.role())["role"] != role:
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.05)
    return answer


def test_the_second_service_is_standby_until_the_lease_is_free(store, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "LEASE_TTL_S", 4.0)

    async def scenario() -> None:
        old, old_trainer = await start_service(store, tmp_path / "old")
        new, _ = await start_service(store, tmp_path / "new")
        try:
            assert (await old.role())["role"] == "writer"
            standby = await new.role()
            assert standby == {"role": "standby", "lease_holder": old.lease.holder, "lease_token": 1, "primed": False}
            with pytest.raises(LeaseLost):  # the standby queues nothing (503 `standby` over REST)
                await new.submit("task-n", "n", "finetune", {}, upload(new, tmp_path, "task-n"), {})
            assert (await new.counts())["queued"] == 0 and new.store.jobs() == []

            await old.submit("task-a", "a", "finetune", {}, upload(old, tmp_path, "task-a"), {})
            old_trainer.release.set()
            assert (await until_status(old, "task-a", "succeeded"))["model_version"] == 2
            await old.submit("task-b", "b", "finetune", {}, upload(old, tmp_path, "task-b"), {})
            old_trainer.release.clear()  # task-b is still running when the old service shuts down
            await until_status(old, "task-b", "running")
            old_trainer.release.set()
            await until_status(old, "task-b", "succeeded")
            old.__del__()  # an orderly shutdown hands the lease over at once

            await until_role(new, "writer", timeout=10)
            new.queue.runner = FakeRunner(new.store, tmp_path / "new")
            await new.submit("task-c", "c", "finetune", {}, upload(new, tmp_path, "task-c"), {})
            assert (await until_status(new, "task-c", "succeeded"))["model_version"] == 4
            assert (await new.get("task-a"))["status"] == "succeeded", "the job records came over"
            versions = store.versions()
            assert versions == [1, 2, 3, 4]
            assert [store.manifest(v).get("task_id") for v in versions] == [None, "task-a", "task-b", "task-c"]
            assert new.lease.token == 2 and (await new.role())["lease_holder"] == new.lease.holder
        finally:
            for deployment in (old, new):
                deployment.__del__()

    asyncio.run(scenario())


def test_a_writer_that_dies_is_replaced_after_the_lease_expires(store, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "LEASE_TTL_S", 4.0)

    async def scenario() -> None:
        old, _ = await start_service(store, tmp_path / "old")
        new, _ = await start_service(store, tmp_path / "new")
        try:
            old.lease.stop_keeping()  # it hangs: no more renewals, no release
            started = time.monotonic()
            await until_role(new, "writer", timeout=10)
            assert time.monotonic() - started >= 1.0, "not before the old lease expired"
            assert (await old.role())["role"] == "standby"
            with pytest.raises(LeaseLost):
                old.store.set_active(1, "a fenced-off writer writes nothing")
        finally:
            for deployment in (old, new):
                deployment.__del__()

    asyncio.run(scenario())
