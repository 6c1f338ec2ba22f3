"""The two back-end Serve deployments: the zero-shot classifier and the job runner.

Classifier: the model version is the `@serve.multiplexed` model id, so each replica keeps a
bounded LRU of loaded versions, Serve routes a request to a replica that already holds its
version, and a pinned version is just another id. `@serve.batch` sits on the classifier's own
method (batches are split per model id by Serve), so concurrent requests share one image-tower
pass; how long a batch waits to fill adapts to load (batch_window.py). Swapping the active
version never touches a loaded model: new requests simply carry the new id, and requests in
flight finish on the version they were routed with.

JobRunner: exactly one replica; it owns every write to the store except uploads (versions, the
active pointer, job records) and runs the JobQueue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from service.serving.batch_window import BatchWindow
from service.settings import ServiceSettings
from service.store import ModelStore

log = logging.getLogger(__name__)


def classifier_thread_count(settings: ServiceSettings) -> int:
    """The torch threads a classifier replica uses: Ray starts actors with one, leaving cores idle."""
    if settings.classifier_threads:
        return settings.classifier_threads
    if settings.classifier_cpus >= 1:
        return int(settings.classifier_cpus)
    return os.cpu_count() or 1


@serve.deployment(name="Classifier")
class Classifier:
    def __init__(self, settings: ServiceSettings) -> None:
        import torch

        from gnsp_core.zeroshot import TextHeadCache

        threads = classifier_thread_count(settings)
        torch.set_num_threads(threads)
        self.decoders = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.settings = settings
        self.store = ModelStore.open(settings.store)
        self.cache_dir = Path(tempfile.mkdtemp(prefix="gnsp-versions-", dir=settings.work_dir))
        self.heads = TextHeadCache(settings.text_head_cache)
        async def load_version(model_id: str):
            return await self._load_version(model_id)

        # Wired per instance so the LRU size comes from the settings (Ray supports this form; the
        # loader must be a plain function, not a bound method).
        self.get_version = serve.multiplexed(max_num_models_per_replica=settings.max_versions_per_replica)(
            load_version)
        self.classify_batch.set_max_batch_size(settings.max_batch_size)
        self.window = BatchWindow(settings.max_batch_size, settings.batch_wait_timeout_s,
                                  settings.busy_batch_wait_max_s)

    async def _load_version(self, model_id: str):
        from service.versions import load_served_model

        return await asyncio.to_thread(load_served_model, self.store, int(model_id), self.cache_dir)

    async def classify(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request: {"images": [bytes], "labels": [str]}; the version is the multiplexed model id.

        The answer's `timing` (ms: time in this replica, the batch's forward, the batch's size) lets
        the ingress say in a Server-Timing header where a request's latency went."""
        start = time.perf_counter()
        self.classify_batch.set_batch_wait_timeout_s(self.window.enter())
        try:
            answer = await self.classify_batch(request)
        finally:
            self.window.leave()
        answer["timing"]["classifier"] = 1000 * (time.perf_counter() - start)
        return answer

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def classify_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        served = await self.get_version(serve.get_multiplexed_model_id())
        start = time.perf_counter()
        answers = await asyncio.to_thread(served.classify, requests, self.heads, self.decoders)
        forward = time.perf_counter() - start
        self.window.forward_took(forward)
        for answer in answers:
            answer["timing"] = {"forward": 1000 * forward, "batch": len(requests)}
        return answers

    async def check_version(self, version: int) -> dict[str, Any]:
        """Load a version and run a smoke test on it, before it may become active."""
        served = await self.get_version(str(version))
        return await asyncio.to_thread(served.check, self.heads)

    def __del__(self) -> None:
        if hasattr(self, "decoders"):
            self.decoders.shutdown(wait=False)
        shutil.rmtree(getattr(self, "cache_dir", ""), ignore_errors=True)


@serve.deployment(name="JobRunner", num_replicas=1, max_ongoing_requests=64, graceful_shutdown_timeout_s=90)
class JobRunner:
    def __init__(self, settings: ServiceSettings, classifier: DeploymentHandle) -> None:
        from service.jobs.attempt import RayTrainRunner
        from service.jobs.tasks import JobQueue
        from service.tuning.searches import TuneJobs
        from service.versions import ensure_base_version

        self.store = ModelStore.open(settings.store)
        self.settings, self.classifier = settings, classifier
        ensure_base_version(self.store, settings)
        self.queue = JobQueue(self.store, settings, RayTrainRunner(settings), self._check_version)
        self.searches = TuneJobs(self.store, settings)
        for note in [*self.queue.recover(), *self.searches.recover()]:
            log.warning("recovery: %s", note)
        self.queue.start()
        self.searches.start()

    def _check_version(self, version: int) -> dict[str, Any]:
        handle = self.classifier.options(multiplexed_model_id=str(version))
        return handle.check_version.remote(version).result(timeout_s=600)

    def check_config(self, method: str, config: dict[str, Any]) -> None:
        """Raise ConfigError for an unknown method or a bad training setting (before the upload is stored)."""
        from gnsp_core.config import TrainConfig
        from gnsp_core.errors import ConfigError

        try:
            TrainConfig.from_dict({**config, "method": method})
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong type
            raise ConfigError(f"invalid training config: {exc}") from None

    def submit(self, task_id: str, name: str, method: str, config: dict[str, Any], upload: str,
               dataset: dict[str, Any]) -> dict[str, Any]:
        return self.queue.submit(task_id, name, method, self.searches.task_config(method, config), upload, dataset)

    def get(self, task_id: str) -> dict[str, Any]:
        return self.queue.view(task_id)

    def list(self) -> list[dict[str, Any]]:
        return self.queue.list()

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self.queue.cancel(task_id)

    def activate(self, version: int, reason: str) -> dict[str, Any]:
        return self.queue.activate(version, reason)

    def counts(self) -> dict[str, int]:
        return self.queue.counts()

    # --- searches (service.tuning.searches) -------------------------------------------------------------

    def submit_search(self, body: dict[str, Any], upload: str | None) -> dict[str, Any]:
        """Queue a search; `upload` is a validated dataset the ingress put in the store (moved out of it here)."""
        if upload is None:
            return self.searches.submit(body)
        scratch = Path(tempfile.mkdtemp(prefix="gnsp-tune-upload-", dir=self.settings.work_dir))
        try:
            dataset = self.store.fetch_upload(upload, scratch)
            return self.searches.submit(body, dataset)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            self.store.delete_job_files(Path(upload).parent.name)

    def search(self, job_id: str) -> dict[str, Any]:
        return self.searches.view(job_id)

    def searches_list(self) -> dict[str, Any]:
        return {"searches": self.searches.list(), "defaults": self.searches.defaults()}

    def cancel_search(self, job_id: str) -> dict[str, Any]:
        return self.searches.cancel(job_id)

    def apply_search(self, job_id: str) -> dict[str, Any]:
        return self.searches.apply(job_id)

    def __del__(self) -> None:
        for worker in (getattr(self, "queue", None), getattr(self, "searches", None)):
            if worker is not None:
                worker.stop()
