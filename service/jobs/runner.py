"""The job runner deployment: exactly one replica, which owns every write to the store except
uploads (versions, the active pointer, job records) and runs the task jobs and the searches.

One writer per store, even across services: the runner holds the store's writer lease
(service/store/lease.py) and only the holder runs jobs. A second service on the same store (an
upgrade's new cluster next to the old one) is standby: it serves classify requests, answers job
calls with 503 `standby`, and takes over (recovering the job records) once the lease is free.

Its event loop only awaits: every method is async, store I/O and the queues' locks are taken in
a thread (`asyncio.to_thread`), the classifier is awaited on the loop (the job worker's load check
waits for that from its own thread), and a cancel waits for the job's end by polling, never
blocking, for at most `CANCEL_WAIT_S`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable

from ray import serve
from ray.serve.handle import DeploymentHandle

from gnsp_core.models import recommended_training

from service.errors import hide_dirs
from service.jobs.states import ENDED
from service.settings import ServiceSettings
from service.jobs.states import STATUSES
from service.store import LeaseLost, ModelStore, StoreLease

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 5.0
"""A cancel answers once the job has ended, or after this long with `cancel_requested` (it ends soon after)."""
CANCEL_POLL_S = 0.2
CHECK_TIMEOUT_S = 600.0
"""The longest a version's load check in the classifier may take."""
LEASE_TTL_S = 15.0
"""How long the writer lease lasts unrenewed: a standby takes over at most this long after the writer died."""


@serve.deployment(name="JobRunner", num_replicas=1, max_ongoing_requests=64, graceful_shutdown_timeout_s=90)
class JobRunner:
    async def __init__(self, settings: ServiceSettings,  # type: ignore[misc]
                       classifier: DeploymentHandle | None = None) -> None:
        # None: the classifier application beside this one (deployed with it), looked up when needed.
        self.settings, self.classifier = settings, classifier
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        import threading

        hide_dirs(self.settings.store, self.settings.work_dir)
        self.store = ModelStore.open(self.settings.store)
        self.lease = self.store.lease = StoreLease(self.store, ttl_s=LEASE_TTL_S)
        self._role_lock = threading.Lock()
        self.queue: Any = None
        self.searches: Any = None
        acquired = self.lease.try_acquire()
        self.lease.keep(on_acquired=self._become_writer, on_lost=self._become_standby)  # renewing from now on
        if acquired:
            self._become_writer()

    def _become_writer(self) -> None:
        """Now holding the lease: make sure a version exists, recover the job records, start the queues."""
        from service.jobs.host import RayTrainRunner
        from service.jobs.tasks import JobQueue
        from service.tuning.searches import TuneJobs
        from service.versions import ensure_base_version

        with self._role_lock:
            if self.queue is not None:
                return
            try:
                runner = RayTrainRunner(self.settings)
                runner.start()  # its process imports the training stack while version 1 is made
                ensure_base_version(self.store, self.settings)
                queue = JobQueue(self.store, self.settings, runner, self._check_version)
                searches = TuneJobs(self.store, self.settings)
                for note in [*queue.recover(), *searches.recover()]:
                    log.warning("recovery: %s", note)
            except LeaseLost:
                log.warning("lost the store's writer lease while taking over; standby again")
                return
            self.queue, self.searches = queue, searches
            queue.start()
            searches.start()

    def _become_standby(self) -> None:
        """The lease is gone (another service holds it): start no more jobs; the running one's writes fail."""
        with self._role_lock:
            queue, searches, self.queue, self.searches = self.queue, self.searches, None, None
        for worker in (queue, searches):
            if worker is not None:
                worker.stop()

    def _writer(self) -> tuple[Any, Any]:
        queue, searches = self.queue, self.searches
        if queue is None or searches is None:
            self.lease.check()  # raises LeaseLost (503 standby) with who holds it
            raise LeaseLost("the job runner is still taking over the store; retry shortly")
        return queue, searches

    async def role(self) -> dict[str, Any]:
        """`writer` (holds the store's lease and runs jobs) or `standby`, the lease's current holder,
        and whether the queue has primed its node (`primed`)."""
        current = await asyncio.to_thread(self.lease.current)
        queue = self.queue
        return {"role": "writer" if queue is not None and self.lease.held else "standby",
                "lease_holder": (current or {}).get("holder"), "lease_token": (current or {}).get("token"),
                "primed": queue is not None and queue.primed}

    async def _check_version_on_loop(self, version: int) -> dict[str, Any]:
        from service.serving.classify_http import classifier_handle

        handle = (self.classifier or classifier_handle()).options(multiplexed_model_id=str(version))
        return await handle.check_version.remote(version)

    def _check_version(self, version: int) -> dict[str, Any]:
        """The job queue's load check, called from a thread (the job worker, an activation): the
        classifier's answer is awaited on the replica's loop while this thread waits for it."""
        if _running_loop() is self._loop:  # it would wait for itself
            raise RuntimeError("the load check must be called from a thread, not the replica's event loop")
        future = asyncio.run_coroutine_threadsafe(self._check_version_on_loop(version), self._loop)
        try:
            return future.result(timeout=CHECK_TIMEOUT_S)
        finally:
            future.cancel()

    async def check_config(self, method: str, config: dict[str, Any], name: str | None = None) -> None:
        """Raise ConfigError for an unknown method, a bad training setting or an unknown schedule
        (before the upload is stored)."""
        from gnsp_core.config import TrainConfig
        from gnsp_core.errors import ConfigError
        from gnsp_core.methods.registry import method_class
        from gnsp_core.schedules import resolve_schedule

        method_class(method)
        config, _ = resolve_schedule(config, name)
        try:
            TrainConfig.from_dict({**config, "method": method})
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong type
            raise ConfigError(f"invalid training config: {exc}") from None

    async def submit(self, task_id: str, name: str, method: str, config: dict[str, Any], upload: str,
                     dataset: dict[str, Any], base_version: int | None = None) -> dict[str, Any]:
        """Queue a job; a `"schedule": NAME` in its config gives the lr and steps of the task's row
        (those the config sets itself win; a task with no row gets a warning on its record)."""
        from gnsp_core.schedules import resolve_schedule

        def queue() -> dict[str, Any]:
            own, warnings = resolve_schedule(config, name)
            queue, searches = self._writer()
            full = {**recommended_training(self.settings.model), **searches.task_config(method, own)}
            return queue.submit(task_id, name, method, full, upload, dataset, base_version, warnings)

        return await asyncio.to_thread(queue)

    async def get(self, task_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(lambda: self._writer()[0].view(task_id))

    async def list(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(lambda: self._writer()[0].list())

    async def cancel(self, task_id: str) -> dict[str, Any]:
        queue = self._writer()[0]
        view = await asyncio.to_thread(queue.cancel, task_id)
        return await settled(view, lambda: queue.view(task_id))

    async def activate(self, version: int, reason: str) -> dict[str, Any]:
        return await asyncio.to_thread(lambda: self._writer()[0].activate(version, reason))

    async def counts(self) -> dict[str, int]:
        queue = self.queue  # a standby has no jobs of its own to count
        return dict.fromkeys(STATUSES, 0) if queue is None else await asyncio.to_thread(queue.counts)

    # --- searches (service.tuning.searches) -------------------------------------------------------------

    async def submit_search(self, body: dict[str, Any], upload: str | None) -> dict[str, Any]:
        """Queue a search; `upload` is a validated dataset the ingress put in the store (copied into the search's folder, then dropped here)."""
        return await asyncio.to_thread(self._submit_search, body, upload)

    def _submit_search(self, body: dict[str, Any], upload: str | None) -> dict[str, Any]:
        searches = self._writer()[1]
        if upload is None:
            return searches.submit(body)
        try:
            return searches.submit(body, upload)
        finally:
            self.store.delete_job_files(Path(upload).parent.name)

    async def search(self, job_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(lambda: self._writer()[1].view(job_id))

    async def searches_list(self) -> dict[str, Any]:
        def both() -> dict[str, Any]:
            searches = self._writer()[1]
            return {"searches": searches.list(), "defaults": searches.defaults()}

        return await asyncio.to_thread(both)

    async def cancel_search(self, job_id: str) -> dict[str, Any]:
        searches = self._writer()[1]
        view = await asyncio.to_thread(searches.cancel, job_id)
        return await settled(view, lambda: searches.view(job_id))

    async def apply_search(self, job_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(lambda: self._writer()[1].apply(job_id))

    def __del__(self) -> None:
        for worker in (getattr(self, "queue", None), getattr(self, "searches", None)):
            if worker is not None:
                worker.stop()
        lease = getattr(self, "lease", None)
        if lease is not None:  # an orderly shutdown hands the store to a standby at once
            try:
                lease.release()
            except OSError:
                log.warning("could not release the store's writer lease; it expires in %.0f s", LEASE_TTL_S)


async def settled(view: dict[str, Any], fetch: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`view` once its job has ended, polling `fetch` in a thread for at most `CANCEL_WAIT_S` (the
    loop goes on serving meanwhile); the latest view when it has not ended by then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CANCEL_WAIT_S
    while view["status"] not in ENDED and loop.time() < deadline:
        await asyncio.sleep(CANCEL_POLL_S)
        view = await asyncio.to_thread(fetch)
    return view


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
