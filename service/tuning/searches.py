"""Searches started through the API (`POST /v1/tune`): queued, run one at a time, resumed after a restart.

Each search lives in its own folder in the store, `<store>/tune/<job_id>/`, on a local disk or in an
object store alike, holding exactly what `gnsp tune --out` writes (request.json, status.json, the
trials table, the plot, best.json, its validation data and its Tune experiment under `ray/`) plus
`job.json`: when it was asked for, whether its winner becomes the default training config for
later tasks, and whether a user cancelled it. Nothing of it stays on the service's node, so the
search's driver and trials may run on any node, and a new service on another node finds and
resumes it (service.tuning.folder). `DELETE` asks a running search to stop on its board, and Tune
ends it (service.tuning.stopping). The search runs in a Ray task, on the service's node when it has
room: a training node lost mid-search then takes only trials and their
Ray Train workers, which Tune restarts from their checkpoints in the store (service.tuning.run).
A search the service was running when it stopped is continued with `Tuner.restore` on the next
start, a search a user cancelled is not. Whatever goes wrong around a search (its Ray task dies,
its folder cannot be read) ends that search `failed`; the searches queued behind it still run.

Over REST the tasks are built-in names or one uploaded dataset (never a path on the server; the
archive is copied into the search's folder), and trials start from a stored model version (the
active one unless `base_version` says otherwise), which each trial fetches by its number.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gnsp_core.data.builtin import BUILTIN_TASKS
from gnsp_core.config import TrainConfig
from gnsp_core.errors import ConfigError
from gnsp_core.models import recommended_training

from service.errors import BadRequestError, ConflictError, NotFoundError, user_reason
from service.jobs.queue import WorkQueue
from service.jobs.states import ENDED
from service.settings import ServiceSettings
from service.store import ModelStore
from service.training.progress import open_board
from service.tuning.data import IN_FOLDER
from service.tuning.folder import SearchFolder
from service.tuning.report import BEST_FILE, read_results, write_status
from service.tuning.request import REQUEST_FILE, TuneRequest, projection_for_range

log = logging.getLogger(__name__)

TUNE_DIR = "tune"
JOB_FILE = "job.json"
DEFAULTS_FILE = "defaults.json"
"""Store file with the training config that tasks submitted without one start from."""
SERVICE_KEYS = ("out_dir", "job_id", "model", "base_state", "workers", "gpus_per_worker", "worker_resources", "store",
                "scratch_dir")
"""TuneRequest fields the service sets itself (where results go, what model, what hardware)."""
HIDDEN_KEYS = ("out_dir", "base_state", "store", "scratch_dir")
"""TuneRequest fields a view leaves out: where things are kept is the service's business."""


class UnknownSearchError(NotFoundError):
    code = "unknown_search"


@ray.remote(num_cpus=0, max_retries=0)
def _run_search(request: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    from service.tuning.run import run_tune_job

    outcome = run_tune_job(TuneRequest.from_dict(request), resume=resume)
    return outcome.best_config.to_dict() if outcome.best_config is not None else None


def _start_search(request: dict[str, Any], resume: bool) -> ray.ObjectRef:
    """The search's Ray task, on this node (the service's; soft: elsewhere if this node cannot take it)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return _run_search.options(scheduling_strategy=here).remote(request, resume)


SEARCH_ID_PATTERN = r"^tune-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$"
"""Every id `new_search_id` makes matches this (the API states it for its `{job_id}` paths)."""


def new_search_id() -> str:
    return f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class TuneJobs:
    """The searches of one store: one worker thread, records and defaults in the store."""

    def __init__(self, store: ModelStore, settings: ServiceSettings) -> None:
        self.store, self.settings = store, settings
        self._lock = threading.Lock()
        self._queue = WorkQueue("gnsp-tune", self._take, on_error=self._unexpected)
        self._running: dict[str, ActorHandle] = {}
        """Running searches: job id -> the search's board, where a cancel asks it to stop."""
        self._unrecorded: dict[str, str] = {}
        """Searches that ended failed when even their status file could not be written: job id -> reason."""

    # --- lifecycle -------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Queue again every search a previous process left unfinished (not those a user cancelled)."""
        notes = []
        for job_id in sorted(self._job_ids(), key=lambda j: self._record(j).get("created", 0)):
            record, status = self._record(job_id), read_results(self._at(job_id))["status"]
            if status in ("succeeded", "failed") or record.get("cancelled"):
                continue
            self._queue.put(job_id)
            notes.append(f"{job_id}: {status}, queued to {'resume' if self._started(job_id) else 'start'}")
        return notes

    def start(self) -> None:
        self._queue.start()

    def stop(self, timeout: float = 30.0) -> None:
        """No search starts after this; a running one is asked to stop (Tune ends it and removes what
        it holds) and waited for up to `timeout`, and it resumes on the next start. A search whose
        driver died with the service instead would leave its trials' placement groups reserved."""
        self._queue.stop(timeout=0)
        with self._lock:
            boards = list(self._running.values())
        for board in boards:
            board.request_stop.remote()
        self._queue.stop(timeout)

    # --- requests --------------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], upload: str | None = None) -> dict[str, Any]:
        """Check the request, file it and queue it; `upload` is a validated archive in the store,
        copied into the search's folder (the caller drops the original)."""
        job_id = new_search_id()
        out = self._at(job_id)
        try:
            options = {k: body.pop(k) for k in ("apply_best", "base_version") if k in body}
            dataset = f"dataset/{Path(upload).name}" if upload is not None else None
            request = self._request(body, out, job_id, dataset, options.get("base_version", "active"))
            if upload is not None:  # a copy inside the store (server-side on S3): trials on any node find it
                self.store.fs.create_dir(self.store.path(out.sub("dataset")), recursive=True)
                self.store.fs.copy_file(self.store.path(upload), self.store.path(out.sub(dataset)))
            request.save()
            self._write_record(job_id, {"job_id": job_id, "created": time.time(),
                                        "apply_best": bool(options.get("apply_best", False)),
                                        "base_version": options.get("base_version", "active"), "cancelled": False})
            write_status(out, "queued")
        except BaseException:
            out.delete()
            raise
        self._queue.put(job_id)
        return self.view(job_id)

    def _request(self, body: dict[str, Any], out: SearchFolder, job_id: str, dataset: str | None,
                 base_version: Any) -> TuneRequest:
        from service.versions import model_spec

        set_by_service = sorted(set(body) & set(SERVICE_KEYS))
        if set_by_service:
            raise BadRequestError(f"{set_by_service} are set by the service; leave them out of the request")
        tasks = body.pop("tasks", [])
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise BadRequestError('tasks must be a list of built-in task names, e.g. ["digits", "animals"]')
        strangers = [t for t in tasks if t not in BUILTIN_TASKS]
        if strangers:
            raise BadRequestError(f"unknown tasks {strangers}: the API tunes on built-in tasks "
                                  f"({', '.join(sorted(BUILTIN_TASKS))}) and on an uploaded dataset "
                                  "(multipart field 'dataset'); it never reads paths on the server")
        tasks = [*tasks, *([IN_FOLDER + dataset] if dataset is not None else [])]
        if not tasks:
            raise BadRequestError("a search needs tasks: name built-in tasks or upload a dataset")
        space = body.pop("space", None) or {}  # null (the whole space or one range): the default ranges
        if any(v is not None for v in space.values()):
            body["space"] = {k: v for k, v in space.items() if v is not None}
        config = body.pop("config", {})
        if not isinstance(config, dict):
            raise BadRequestError("config must be a JSON object of training settings")
        body["config"] = {**recommended_training(self.settings.model), **config, "method": config.get("method", "gnsp")}
        if "threshold" in body.get("space", {}):  # the range names the rule it searches
            body["config"]["projection"] = {**config.get("projection", {}), **projection_for_range(body["space"]["threshold"])}
        service = {"out_dir": out.rel, "store": out.location, "job_id": job_id, "tasks": tasks,
                   "workers": max(self.settings.workers, 1), "gpus_per_worker": self.settings.gpus_per_worker,
                   "worker_resources": dict(self.settings.worker_resources), "scratch_dir": self.settings.work_dir}
        if base_version is None:
            service["model"] = model_spec(self.settings).to_dict()
        else:
            service["base_version"] = self._base_version(base_version)
        try:
            return TuneRequest.from_dict({**body, **service})
        except ConfigError as exc:
            raise BadRequestError(str(exc)) from None

    def _base_version(self, base_version: Any) -> int:
        """The committed version trials start from (they fetch it themselves, wherever they run)."""
        version = self.store.active() if base_version == "active" else base_version
        if not isinstance(version, int) or isinstance(version, bool):
            raise BadRequestError('base_version must be a version number, "active" or null (the bare model)')
        self.store.manifest(version)  # UnknownVersionError unless committed
        return version

    def view(self, job_id: str) -> dict[str, Any]:
        """The search as the API shows it: status, progress over its trials, table, best trial."""
        out = self._folder(job_id)
        record, results = self._record(job_id), read_results(out)
        request = out.read_json(REQUEST_FILE)
        tasks, trials = len(request["tasks"]), request["trials"]
        done = sum(1.0 if r["status"] in ("complete", "stopped", "error") else min(r["tasks_done"] / tasks, 1.0)
                   for r in results["trials"])
        progress = 1.0 if results["status"] == "succeeded" else round(min(done / trials, 0.99), 4)
        visible = {k: v for k, v in request.items() if k not in HIDDEN_KEYS}
        if job_id in self._unrecorded:
            results.update(status="failed", error=self._unrecorded[job_id])
        elif results["status"] in ENDED and job_id in self._running:
            # The search's task wrote its end, the worker has not recorded it yet (applying its best
            # config, or turning it back to queued when the service stops): not ended for a client.
            results["status"], progress = "running", min(progress, 0.99)
        return {**record, **results, "progress": progress, "request": visible,
                "applied": (self.defaults() or {}).get("source") == job_id}

    def list(self) -> list[dict[str, Any]]:
        return [self.view(j) for j in sorted(self._job_ids(), key=lambda j: self._record(j).get("created", 0))]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """A queued search never starts; a running one is asked to stop (Tune stops its trials) and
        ends `cancelled` once its Ray task has returned. This call never waits for that."""
        status = self.view(job_id)["status"]
        if status in ENDED:
            raise ConflictError(f"search {job_id!r} already ended ({status}); nothing to cancel")
        self._write_record(job_id, {**self._record(job_id), "cancelled": True})
        with self._lock:  # the worker checks `cancelled` under this lock before it starts a search
            if self._queue.remove(job_id):
                write_status(self._at(job_id), "cancelled", "cancelled before it started")
            board = self._running.get(job_id)
        if board is not None:
            board.request_stop.remote()  # Tune ends the search (service.tuning.stopping); the worker records the end
        return self.view(job_id)

    def apply(self, job_id: str) -> dict[str, Any]:
        """Make the search's best config the default training config of later tasks."""
        best = self._folder(job_id).read_json(BEST_FILE)
        if best is None:
            raise ConflictError(f"search {job_id!r} has no best config (yet); GET /v1/tune/{job_id} shows its status")
        config = TrainConfig.from_dict(best).to_dict()
        self.store.write_json(DEFAULTS_FILE, {"config": config, "source": job_id, "updated": time.time()})
        return self.defaults() or {}

    def defaults(self) -> dict[str, Any] | None:
        return self.store.read_json(DEFAULTS_FILE)

    def task_config(self, method: str, config: dict[str, Any]) -> dict[str, Any]:
        """A submitted task's config: the default (from a search) for its method, overridden by its own."""
        default = (self.defaults() or {}).get("config") or {}
        if default.get("method") != method:
            return config
        return {**{k: v for k, v in default.items() if k != "method"}, **config}

    # --- the worker ------------------------------------------------------------------------------

    def _take(self, job_id: str) -> bool:
        """The queue's handler: start the search in a Ray task (unless cancelled meanwhile), wait for it."""
        with self._lock:
            if self._record(job_id).get("cancelled"):
                write_status(self._at(job_id), "cancelled", "cancelled before it started")
                return True
            request = self._at(job_id).read_json(REQUEST_FILE)
            board = self._running[job_id] = open_board(job_id)
        try:
            self._finish(job_id, _start_search(request, self._started(job_id)))
        finally:
            ray.kill(board)
        return True

    def _finish(self, job_id: str, ref: ray.ObjectRef) -> None:
        """Record how the search ended. Until this returns the view shows it running (see `view`)."""
        try:
            self._record_end(job_id, ref)
        finally:
            with self._lock:
                self._running.pop(job_id, None)

    def _record_end(self, job_id: str, ref: ray.ObjectRef) -> None:
        out = self._at(job_id)
        try:
            best = ray.get(ref)
        except Exception as exc:  # the search wrote its own status; this covers what happened around it
            if self._record(job_id).get("cancelled"):
                write_status(out, "cancelled", "cancelled by the user")
            elif read_results(out)["status"] not in ENDED:
                self._unexpected(job_id, exc)
            return
        record = self._record(job_id)
        status = read_results(out)["status"]
        if record.get("cancelled"):
            if status != "succeeded":
                write_status(out, "cancelled", "cancelled by the user")
        elif status != "succeeded" and self._queue.stopping:  # stopped with the service: resumed on its next start
            write_status(out, "queued", "interrupted when the service stopped; it resumes on the next start")
        elif best is not None and record.get("apply_best") and status == "succeeded":
            try:
                self.apply(job_id)
            except Exception:
                log.exception("search %s succeeded but its best config could not be applied", job_id)

    def _unexpected(self, job_id: str, error: BaseException) -> None:
        """End a search on an error nobody planned for (the queue's error handler too): `failed`
        (`cancelled` if a user cancelled it), the detail in the service log."""
        log.error("search %s failed", job_id, exc_info=error)
        with self._lock:
            self._running.pop(job_id, None)
        try:
            if read_results(self._at(job_id))["status"] not in ENDED:
                cancelled = bool(self._record(job_id).get("cancelled"))
                reason = "cancelled by the user" if cancelled else user_reason(error)
                write_status(self._at(job_id), "cancelled" if cancelled else "failed", reason)
        except Exception:
            log.exception("search %s: could not record its end", job_id)
            self._unrecorded[job_id] = "the service could not record this search's end; see the service log"

    # --- records ---------------------------------------------------------------------------------

    def _at(self, job_id: str) -> SearchFolder:
        return SearchFolder(self.store.uri, f"{TUNE_DIR}/{job_id}")

    def _started(self, job_id: str) -> bool:
        return self._at(job_id).exists("ray")

    def _job_ids(self) -> list[str]:
        return [info.base_name for info in self.store.listdir(TUNE_DIR)
                if info.type == pafs.FileType.Directory and self.store.exists(f"{TUNE_DIR}/{info.base_name}/{JOB_FILE}")]

    def _folder(self, job_id: str) -> SearchFolder:
        if not job_id.startswith("tune-") or "/" in job_id or not self._at(job_id).exists(JOB_FILE):
            raise UnknownSearchError(f"search {job_id!r} does not exist; GET /v1/tune lists the searches")
        return self._at(job_id)

    def _record(self, job_id: str) -> dict[str, Any]:
        record = self.store.read_json(f"{TUNE_DIR}/{job_id}/{JOB_FILE}")
        if record is None:
            raise UnknownSearchError(f"search {job_id!r} has no record")
        return record

    def _write_record(self, job_id: str, record: dict[str, Any]) -> None:
        self.store.write_json(f"{TUNE_DIR}/{job_id}/{JOB_FILE}", record)
