"""Live progress of a training job: a small named Ray actor that rank 0 writes and callers read.

`ray.train.report` only moves metrics at checkpoints, and it is a barrier for every worker, so it
is the wrong channel for per-step progress. Instead rank 0 sends each step's numbers (at most a
few times a second) to a `ProgressBoard` actor, fire-and-forget. The actor is named
`gnsp-progress:<job id>` in the `gnsp` namespace, so the process that started the job polls it
through the handle (`watch_board`) and any other driver on the cluster through `read_board`.
It needs no CPU and keeps only the latest snapshot, so a job costs the cluster nothing extra.
"""

from __future__ import annotations

import _thread
import dataclasses
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

if TYPE_CHECKING:  # the board actor's process stays free of torch
    from gnsp_core.task_context import Progress

NAMESPACE = "gnsp"


@dataclass
class JobProgress:
    """What a caller sees of a running task: where it is, how fast, and whether it restarted."""

    task: str = ""
    phase: str = "queued"
    """queued | starting | train | <method phases, e.g. statistics> | saving | done"""
    step: int = 0
    total: int = 0
    loss: float | None = None
    samples_per_s: float = 0.0
    eta_s: float | None = None
    resumed_from: int | None = None
    """The checkpoint step the current attempt started from (None: started from scratch)."""
    starts: int = 0
    """How many times the worker group started: 2 or more means it recovered from a failure."""
    task_index: int = 0
    num_tasks: int = 1
    updated: float = 0.0
    """Wall-clock time (time.time()) of the snapshot on the worker."""

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Holds the latest JobProgress of one job, and whether the job is to stop early."""

    def __init__(self) -> None:
        self._latest = JobProgress()
        self._stop = False

    def reset(self, task_index: int, num_tasks: int) -> None:
        self._latest = JobProgress(task_index=task_index, num_tasks=num_tasks, updated=time.time())

    def update(self, changes: dict) -> None:
        if changes.get("phase") == "starting":
            changes = {**changes, "starts": self._latest.starts + 1}
        self._latest = dataclasses.replace(self._latest, **changes)

    def latest(self) -> JobProgress:
        return self._latest

    def request_stop(self) -> None:
        """The job is to end early (cancelled, or the service stops): the attempt's driver polls this
        (a search's: Tune, through service.tuning.stopping.StopRequested)."""
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop


def board_name(job_id: str) -> str:
    return f"gnsp-progress:{job_id}"


def open_board(job_id: str) -> ActorHandle:
    """The job's board, created on first use (owned by the calling driver) on the caller's node, so
    that it goes only with the process that made it: a training node lost takes no board."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ProgressBoard.options(name=board_name(job_id), namespace=NAMESPACE, get_if_exists=True,
                                 scheduling_strategy=here).remote()


def find_board(job_id: str) -> ActorHandle | None:
    """The job's board if one is running, without creating it."""
    try:
        return ray.get_actor(board_name(job_id), namespace=NAMESPACE)
    except ValueError:
        return None


class BoardReporter:
    """Worker side: turns learn_task's Progress into board updates, throttled so a fast loop stays fast."""

    def __init__(self, board: ActorHandle | None, min_interval_s: float = 0.25) -> None:
        self.board, self.min_interval_s = board, min_interval_s
        self.last: Progress | None = None
        self._sent = 0.0

    def send(self, **changes) -> None:
        if self.board is not None:
            self.board.update.remote({**changes, "updated": time.time()})

    def __call__(self, progress: Progress) -> None:
        self.last = progress
        now = time.monotonic()
        if now - self._sent < self.min_interval_s and progress.step < progress.total:
            return
        self._sent = now
        self.send(task=progress.task, phase=progress.phase, step=progress.step, total=progress.total,
                  loss=progress.loss, samples_per_s=progress.samples_per_s, eta_s=progress.eta_s)


@contextmanager
def watch_board(board: ActorHandle, callback: Callable[[JobProgress], None] | None,
                interval_s: float = 0.5) -> Iterator[None]:
    """Driver side: call `callback` with the board's snapshot every `interval_s` while the body runs."""
    if callback is None:
        yield
        return

    def poll(done: threading.Event) -> None:
        while not done.wait(interval_s):
            callback(ray.get(board.latest.remote()))

    try:
        with _polling(poll, "gnsp-progress"):
            yield
    finally:
        callback(ray.get(board.latest.remote()))


@contextmanager
def interrupted_on_stop_request(board: ActorHandle, interval_s: float = 0.5) -> Iterator[None]:
    """Driver side: while the body runs on the main thread, interrupt it once the board asks for a
    stop, as Ray's own cancel of a task does (`_thread.interrupt_main`): inside Ray Train's `fit()`
    its SIGINT handler aborts the run gracefully; elsewhere it is a KeyboardInterrupt."""

    def poll(done: threading.Event) -> None:
        while not done.wait(interval_s):
            try:
                if ray.get(board.stop_requested.remote(), timeout=5):
                    _thread.interrupt_main()
                    return
            except ray.exceptions.GetTimeoutError:
                continue
            except ray.exceptions.RayError:  # the board is gone: nobody waits for this attempt
                return

    with _polling(poll, "gnsp-attempt-stop"):
        yield


@contextmanager
def _polling(poll: Callable[[threading.Event], None], name: str) -> Iterator[None]:
    """`poll(done)` in a thread of its own while the body runs; `done` is set when it ends."""
    done = threading.Event()
    thread = threading.Thread(target=poll, args=(done,), name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
