"""A first-in first-out queue of job ids served by one worker thread.

Task jobs and searches both need exactly this: jobs run one at a time in submission order (version
N+1 trains from version N), a queued job can be taken out before it starts, shutdown stops the
worker between jobs, and an unexpected error in one job is logged and handed to `on_error` (which
records that job as failed) without killing the worker, so the jobs queued behind it still run.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

Handler = Callable[[str], bool]
"""Runs one job; returns False when the worker must stop (the job is then put back at the front)."""
ErrorHandler = Callable[[str, BaseException], None]
"""Records that a job ended with an error its handler did not expect (it must not raise either)."""


class WorkQueue:
    """FIFO of job ids and the one thread that hands them to `handler`."""

    def __init__(self, name: str, handler: Handler, on_error: ErrorHandler | None = None,
                 before_first: Callable[[], None] | None = None) -> None:
        self.name, self.handler, self.on_error, self.before_first = name, handler, on_error, before_first
        self._wake = threading.Condition()
        self._ids: deque[str] = deque()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def put(self, job_id: str) -> None:
        with self._wake:
            self._ids.append(job_id)
            self._wake.notify()

    def remove(self, job_id: str) -> bool:
        """Take a job out before the worker starts it; False when it is not (or no longer) queued."""
        with self._wake:
            if job_id in self._ids:
                self._ids.remove(job_id)
                return True
            return False

    def __contains__(self, job_id: str) -> bool:
        with self._wake:
            return job_id in self._ids

    def start(self) -> None:
        """Start the worker thread once; a queue stopped before it started never starts. Start and
        stop may come from different threads (a service promoted to writer by its lease's keeper
        while it shuts down), so stop sees either no thread or a started one."""
        with self._wake:
            if self._thread is not None or self._stopping.is_set():
                return
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """No job starts after this; waits up to `timeout` for the running one to return."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _next(self) -> str | None:
        with self._wake:
            while not self._ids and not self._stopping.is_set():
                self._wake.wait(1.0)
            return None if self._stopping.is_set() else self._ids.popleft()

    def _loop(self) -> None:
        if self.before_first is not None:  # e.g. warming the node up while no job is waiting
            try:
                self.before_first()
            except Exception:
                log.exception("%s: the work before the first job failed; jobs run without it", self.name)
        while (job_id := self._next()) is not None:
            try:
                keep_going = self.handler(job_id)
            except BaseException as exc:  # the worker must survive anything a job does
                self._report(job_id, exc)
                continue
            if keep_going is False:
                with self._wake:
                    self._ids.appendleft(job_id)
                return

    def _report(self, job_id: str, error: BaseException) -> None:
        if self.on_error is None:
            log.error("%s: unexpected error while running %s", self.name, job_id, exc_info=error)
            return
        try:
            self.on_error(job_id, error)
        except Exception:
            log.exception("%s: could not record the failure of %s", self.name, job_id)
