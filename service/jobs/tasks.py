"""The job queue: one task job at a time, in submission order, each on a Ray Train trainer.

Version N+1 trains from version N's weights *and* projector statistics, so two jobs must never
train on the same base at once: a single `JobQueue` (inside the single JobRunner replica) owns a
FIFO and one worker thread. Every state change is written to the store's job record first, so a
restarted service knows exactly what was queued and what was running:

- queued jobs are queued again, in the same order;
- a job that was running is resumed from its last Ray Train checkpoint (the run is named by the
  task id inside the store, so re-running it continues it), or marked failed with reason
  "interrupted" when `on_restart="fail"` or it was already interrupted `max_attempts` times.

A finished attempt has published a new version (service.jobs.attempt). Then the quality gate and the
activation policy decide: a version whose held-out accuracy dropped more than allowed is kept but
not activated and the job fails with both numbers; otherwise, with activation `auto` and the base
still active, the classifier loads and checks the version and only then is the pointer moved.

A job always ends: an error the worker did not expect, or a store write that fails, ends it
`failed` (in memory at least, when the store refuses even that write; a restart then finds it
`running` and resumes or fails it), and a version published just before a cancel took effect is
recorded on the cancelled job, stored but not activated.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from gnsp_core.errors import GnspError

from service.errors import ConflictError, UnknownTaskError, user_reason
from service.jobs.lineage import chain_base
from service.jobs.queue import WorkQueue
from service.jobs.states import ENDED, STATUSES
from service.settings import ServiceSettings
from service.store import ModelStore

log = logging.getLogger(__name__)

RUNNER_FILE = "runner.json"


class JobCancelled(Exception):
    """The user cancelled the job while it ran."""


class JobInterrupted(Exception):
    """The service is stopping: the job stays `running` in the store and resumes on restart."""


@dataclass
class AttemptOutcome:
    version: int
    metrics: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    """Runs one attempt of a job (train, evaluate, publish) and returns the published version.

    `should_stop()` returns "cancel" or "stop" when the attempt must end early; `report(fraction,
    phase)` publishes live progress. A runner may also have a `warm()` method, which the queue
    runs once before its first job (what every job would otherwise compute for itself), and a
    `close()` method, which the queue calls once it has stopped (what the runner holds between jobs)."""

    def __call__(self, record: dict[str, Any], should_stop: Callable[[], str | None],
                 report: Callable[[float, str], None]) -> AttemptOutcome: ...


TASK_ID_PATTERN = r"^task-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$"
"""Every id `new_task_id` makes matches this (the API states it for its `{task_id}` paths)."""


def new_task_id() -> str:
    """Readable and sortable: task-20250101-120000-1a2b3c."""
    return f"task-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def published_by(store: ModelStore, task_id: str) -> AttemptOutcome | None:
    """The version this job published, if any (newest first): a resumed job never publishes twice,
    and a cancelled one records what it published before the cancel took effect."""
    for version in reversed(store.versions()):
        manifest = store.manifest(version)
        if manifest.get("task_id") == task_id:
            return AttemptOutcome(version, manifest.get("metrics", {}), manifest.get("gate", {}))
    return None


def gate_message(gate: dict[str, Any], version: int) -> str:
    return (f"quality gate: held-out zero-shot accuracy of version {version} is {gate['heldout_accuracy']:.2f}%, "
            f"more than {gate['max_drop']:g} points below the {gate['base_heldout_accuracy']:.2f}% of version "
            f"{gate['base_version']}; version {version} is stored but not activated")


class JobQueue:
    """Submission-ordered jobs, one worker thread, records persisted in the store."""

    def __init__(self, store: ModelStore, settings: ServiceSettings, runner: Runner,
                 check_version: Callable[[int], Any]) -> None:
        self.store, self.settings, self.runner, self.check_version = store, settings, runner, check_version
        self._lock = threading.RLock()
        self._activation = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self._queue = WorkQueue("gnsp-jobs", self._take, on_error=self._unexpected, before_first=self._warm)
        self._cancel: dict[str, threading.Event] = {}
        self._live: dict[str, tuple[float, str]] = {}
        self._owner = uuid.uuid4().hex
        self._primed = threading.Event()
        self._seq = 0

    # --- lifecycle -------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Load every job record; requeue or fail what a previous process left unfinished."""
        self.store.discard_incomplete()
        notes = []
        for record in self.store.jobs():
            self._seq = max(self._seq, record.get("seq", 0))
            self._records[record["task_id"]] = record
            if record["status"] == "running":
                notes.append(self._recover_running(record))
            if record["status"] == "queued":
                self._queue.put(record["task_id"])
        live = {tid for tid, r in self._records.items() if r["status"] not in ENDED}
        for task_id in set(self.store.upload_ids()) - live:
            self.store.delete_job_files(task_id)  # uploads of ended (or never recorded) jobs
        return notes

    def _recover_running(self, record: dict[str, Any]) -> str:
        attempts = record.get("attempts", 1)
        if self.settings.on_restart == "resume" and attempts < self.settings.max_attempts:
            self._save(record, status="queued", phase="resuming", resumed=True)
            return f"{record['task_id']}: interrupted, queued to resume"
        reason = (f"interrupted: the service stopped while this job was running (attempt {attempts}); "
                  "submit the task again")
        self._save(record, status="failed", error=reason, finished=time.time())
        self.store.delete_job_files(record["task_id"])
        return f"{record['task_id']}: {reason}"

    def start(self) -> None:
        self.store.write_json(RUNNER_FILE, {"owner": self._owner, "since": time.time()})
        self._queue.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; a running attempt is interrupted (it resumes on the next start); then the
        runner lets go of what it holds (a service that turns standby keeps no idle attempt host)."""
        self._queue.stop(timeout)
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    # --- requests --------------------------------------------------------------------------------

    def submit(self, task_id: str, name: str, method: str, config: dict[str, Any], upload: str,
               dataset: dict[str, Any] | None = None, base_version: int | None = None,
               warnings: list[str] | None = None) -> dict[str, Any]:
        """Queue a job. `base_version` (checked to exist by the caller) fixes the version it trains
        from; None: the head of the chain when it starts (service.jobs.lineage)."""
        with self._lock:
            self._seq += 1
            record = {"task_id": task_id, "seq": self._seq, "name": name, "status": "queued", "method": method,
                      "config": config, "upload": upload, "dataset": dataset or {}, "created": time.time(),
                      "started": None, "finished": None, "base_version": base_version,
                      "base_requested": base_version is not None, "model_version": None,
                      "activated": False, "metrics": {}, "error": None, "attempts": 0, "progress": 0.0,
                      "phase": "queued", "warnings": list(warnings or [])}
            self._save(record)
            self._queue.put(task_id)
        return self.view(task_id)

    def view(self, task_id: str) -> dict[str, Any]:
        """The record as the API shows it, with live progress for a running job."""
        with self._lock:
            record = self._records.get(task_id)
            if record is None:
                raise UnknownTaskError(f"task {task_id!r} does not exist; GET /v1/tasks lists the tasks")
            view = dict(record)
            if record["status"] == "running" and task_id in self._live:
                view["progress"], view["phase"] = self._live[task_id]
            view["cancel_requested"] = task_id in self._cancel and self._cancel[task_id].is_set()
            return view

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            ids = sorted(self._records, key=lambda t: self._records[t]["seq"])
        return [self.view(task_id) for task_id in ids]

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(STATUSES, 0)
            for record in self._records.values():
                counts[record["status"]] += 1
            return counts

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Queued: it never runs. Running: its trainer is asked to stop, and the job ends `cancelled`
        once it has; this call never waits."""
        with self._lock:
            status = self.view(task_id)["status"]
            if status in ENDED:
                raise ConflictError(f"task {task_id!r} already ended ({status}); nothing to cancel")
            self._cancel.setdefault(task_id, threading.Event()).set()
            if status == "queued" and self._queue.remove(task_id):  # not yet taken by the worker
                self._end(task_id, "cancelled", error="cancelled before it started")
            return self.view(task_id)

    def activate(self, version: int, reason: str) -> dict[str, Any]:
        """Load-check `version` in the classifier, then move the pointer (rollback or pin)."""
        with self._activation:
            self.store.manifest(version)  # UnknownVersionError for a version that does not exist
            pointer = self.store.pointer()
            if pointer.get("version") == version:
                return pointer
            self.check_version(version)
            return self.store.set_active(version, reason)

    # --- the worker ------------------------------------------------------------------------------

    @property
    def primed(self) -> bool:
        """Whether the work before the first job is over (done, failed or not needed)."""
        return self._primed.is_set()

    def _warm(self) -> None:
        warm = getattr(self.runner, "warm", None)
        try:
            if warm is not None:
                warm()
        finally:
            self._primed.set()

    def _take(self, task_id: str) -> bool:
        """The queue's handler: run the job, unless another runner took over the store (then stop)."""
        if (self.store.read_json(RUNNER_FILE) or {}).get("owner") != self._owner:
            log.warning("another job runner took over the store; this one stops taking jobs")
            return False
        self._run(task_id)
        return True

    def _run(self, task_id: str) -> None:
        with self._lock:
            record = self._records[task_id]
            cancel = self._cancel.setdefault(task_id, threading.Event())
            if cancel.is_set():  # cancelled between leaving the queue and starting
                self._end(task_id, "cancelled", error="cancelled before it started")
                return

        def should_stop() -> str | None:
            return "cancel" if cancel.is_set() else "stop" if self._queue.stopping else None

        try:
            self._start(record)
            outcome = self.runner(dict(record), should_stop, lambda f, p: self._report(task_id, f, p))
            if cancel.is_set():
                self._cancelled(task_id, outcome)
                return
            self._finish(task_id, outcome)
        except JobCancelled:
            self._cancelled(task_id, None)
        except JobInterrupted:
            log.info("job %s interrupted by shutdown; it resumes on the next start", task_id)
        except GnspError as exc:
            log.warning("job %s failed: %s", task_id, exc)
            self._end(task_id, "failed", error=user_reason(exc))
        except Exception as exc:
            self._unexpected(task_id, exc)

    def _start(self, record: dict[str, Any]) -> None:
        with self._lock:
            base = record.get("base_version") or chain_base(self.store, self.settings.activation,
                                                            self._records.values())
            self._save(record, status="running", started=time.time(), attempts=record.get("attempts", 0) + 1,
                       base_version=base, phase="starting")
            self._live[record["task_id"]] = (record.get("progress") or 0.0, "starting")

    def _unexpected(self, task_id: str, error: BaseException) -> None:
        """End a job on an error nobody planned for (the queue's error handler too): `failed`, the
        detail in the service log."""
        log.error("job %s failed", task_id, exc_info=error)
        with self._lock:
            if task_id not in self._records or self._records[task_id]["status"] in ENDED:
                return
        self._end(task_id, "failed", error=user_reason(error))

    def _cancelled(self, task_id: str, outcome: AttemptOutcome | None) -> None:
        """End a cancelled job, recording the version it published if the cancel came too late to
        prevent that (stored, never activated)."""
        if outcome is None:
            try:
                outcome = published_by(self.store, task_id)
            except Exception:
                log.exception("job %s: could not look for a version it published before the cancel", task_id)
        if outcome is None:
            self._end(task_id, "cancelled", error="cancelled while running")
            return
        version = outcome.version
        self._end(task_id, "cancelled", error="cancelled while running", model_version=version,
                  metrics=outcome.metrics, activated=False,
                  note=(f"version {version} was published before the cancel took effect; it is stored, not "
                        f"activated: activate it with POST /v1/models/{version}/activate"))

    def _report(self, task_id: str, fraction: float, phase: str) -> None:
        with self._lock:
            previous = self._live.get(task_id, (0.0, ""))[0]
            self._live[task_id] = (round(max(previous, min(fraction, 0.99)), 4), phase)

    def _finish(self, task_id: str, outcome: AttemptOutcome) -> None:
        record = self._records[task_id]
        version, gate = outcome.version, outcome.gate
        try:
            with self._lock:
                self._save(record, model_version=version, metrics=outcome.metrics)
        except Exception:
            log.exception("job %s: the store refused its record of version %s", task_id, version)
            self._end(task_id, "failed", model_version=version, metrics=outcome.metrics,
                      error=f"the store could not record version {version} on this job; see the service log")
            return
        if gate and not gate.get("passed", True):
            self._end(task_id, "failed", error=gate_message(gate, version))
            return
        if self.settings.activation == "manual":
            self._end(task_id, "succeeded",
                      note=f"version {version} stored; activate it with POST /v1/models/{version}/activate")
            return
        with self._activation:
            if self.store.active() == version:  # activated just before a crash cut the job short
                self._end(task_id, "succeeded", activated=True)
                return
            active = self.store.active()
            if active != record["base_version"]:
                why = (f"it was trained from version {record['base_version']}, not the active version {active}"
                       if record.get("base_requested") else "the active version changed while the job ran")
                self._end(task_id, "succeeded", note=f"{why}; version {version} stored, not activated: activate it "
                                                     f"with POST /v1/models/{version}/activate")
                return
            try:
                self.check_version(version)
            except Exception as exc:
                log.warning("job %s: version %s failed its load check: %s", task_id, version, exc)
                self._end(task_id, "failed",
                          error=f"version {version} failed its load check and was not activated: {user_reason(exc)}")
                return
            self.store.set_active(version, f"task {task_id} ({record['name']})")
        self._end(task_id, "succeeded", activated=True)

    def _end(self, task_id: str, status: str, **changes: Any) -> None:
        """Record the job's end; it ends `failed` if the store refuses the write (in memory at least)."""
        with self._lock:
            record = self._records[task_id]
            progress = 1.0 if status == "succeeded" else self._live.get(task_id, (record.get("progress", 0.0), ""))[0]
            end = {"status": status, "finished": time.time(), "progress": progress, "phase": status, **changes}
            try:
                self._save(record, **end)
            except Exception:
                log.exception("job %s: the store refused its end record (%s)", task_id, status)
                self._save_failed_end(record, end)
            self._live.pop(task_id, None)
        try:
            self.store.delete_job_files(task_id)
        except Exception:  # left for recover() to remove on the next start
            log.exception("job %s: could not delete its upload", task_id)

    def _save_failed_end(self, record: dict[str, Any], end: dict[str, Any]) -> None:
        reason = f"the store could not record this job's end ({end['status']}); see the service log"
        record.update({**end, "status": "failed", "phase": "failed", "error": reason})
        try:
            self.store.save_job(record)
        except Exception:  # memory says failed; a restart finds it running and resumes or fails it
            log.exception("job %s: the store refused the failed record too", record["task_id"])

    def _save(self, record: dict[str, Any], **changes: Any) -> None:
        """Persist first, then publish in memory: what the API shows is always on disk."""
        updated = {**record, **changes}
        self.store.save_job(updated)
        record.clear()
        record.update(updated)
        self._records[updated["task_id"]] = record
