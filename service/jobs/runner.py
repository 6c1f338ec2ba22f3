"""The job runner deployment: exactly one replica, which owns every write to the store except
uploads (versions, the active pointer, job records) and runs the task jobs and the searches."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from gnsp_core.models import recommended_training

from service.errors import hide_dirs
from service.settings import ServiceSettings
from service.store import ModelStore

log = logging.getLogger(__name__)


@serve.deployment(name="JobRunner", num_replicas=1, max_ongoing_requests=64, graceful_shutdown_timeout_s=90)
class JobRunner:
    def __init__(self, settings: ServiceSettings, classifier: DeploymentHandle) -> None:
        from service.jobs.attempt import RayTrainRunner
        from service.jobs.tasks import JobQueue
        from service.tuning.searches import TuneJobs
        from service.versions import ensure_base_version

        hide_dirs(settings.store, settings.work_dir)
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

    def check_config(self, method: str, config: dict[str, Any], name: str | None = None) -> None:
        """Raise ConfigError for an unknown method, a bad training setting, an unknown schedule or a
        task `name` the schedule has no row for (before the upload is stored)."""
        from gnsp_core.config import TrainConfig
        from gnsp_core.errors import ConfigError
        from gnsp_core.methods.registry import method_class
        from gnsp_core.schedules import resolve_schedule

        method_class(method)
        config = resolve_schedule(config, name)
        try:
            TrainConfig.from_dict({**config, "method": method})
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong type
            raise ConfigError(f"invalid training config: {exc}") from None

    def submit(self, task_id: str, name: str, method: str, config: dict[str, Any], upload: str,
               dataset: dict[str, Any]) -> dict[str, Any]:
        """Queue a job; a `"schedule": NAME` in its config becomes the lr and steps of the task's row."""
        from gnsp_core.schedules import resolve_schedule

        own = resolve_schedule(config, name)
        config = {**recommended_training(self.settings.model), **self.searches.task_config(method, own)}
        return self.queue.submit(task_id, name, method, config, upload, dataset)

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
        try:
            with tempfile.TemporaryDirectory(prefix="gnsp-tune-upload-", dir=self.settings.work_dir) as scratch:
                return self.searches.submit(body, self.store.fetch_upload(upload, Path(scratch)))
        finally:
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
