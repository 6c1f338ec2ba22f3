"""How a running search is stopped, and what a stopped search leaves behind.

A search runs on its job's board (`service.training.progress.ProgressBoard`, named by the search's
job id): the service opens it before the search starts and asks it to stop there (`request_stop`);
Tune reads that through `StopRequested.stop_all` and ends the experiment its own way, removing its
trials' placement groups. Not Ray's task cancel: its KeyboardInterrupt lands wherever the search
is, and landing in Tune's own clean-up it left the trials' placement groups reserved.

Ending the experiment stops the trials that are still learning a task, and with a trial's process
goes its Ray Train controller, whose worker group's placement group nothing of Ray's removes on a
Ray without the State API: the search releases those once Tune has finished (`search_board`,
service.training.orphans).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

import ray
from ray import tune
from ray.actor import ActorHandle

from service.training.orphans import release_orphaned_placement_groups
from service.training.progress import find_board, open_board

log = logging.getLogger(__name__)


class StopRequested(tune.Stopper):
    """Ends the whole search once its board asks for a stop. Holds the job id, not the board: Tune
    keeps its stopper with the experiment, and a resumed search has a new board by the same name."""

    def __init__(self, job_id: str, interval_s: float = 1.0) -> None:
        self.job_id, self.interval_s = job_id, interval_s
        self._checked, self._stop = 0.0, False

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        now = time.monotonic()
        if not self._stop and now - self._checked >= self.interval_s:  # Tune asks on every step
            self._checked = now
            board = find_board(self.job_id)
            self._stop = board is not None and was_stopped(board, timeout_s=5)
        return self._stop

    def __getstate__(self) -> dict:
        return {"job_id": self.job_id, "interval_s": self.interval_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def was_stopped(board: ActorHandle, timeout_s: float = 10.0) -> bool:
    """Whether the search was asked to stop; a board that no longer answers asked nothing."""
    try:
        return ray.get(board.stop_requested.remote(), timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        return False


@contextmanager
def search_board(job_id: str) -> Iterator[ActorHandle]:
    """The search's board for the block (the service's, or one of its own that goes with the block);
    afterwards the placement groups of trial runs that Tune's stop cut short are released."""
    board = find_board(job_id)
    own = board is None
    if own:
        board = open_board(job_id)
    try:
        yield board
    finally:
        try:
            released = release_orphaned_placement_groups()
            if released:
                log.warning("released placement groups %s of trial runs the search's stop cut short", released)
        finally:
            if own:
                ray.kill(board)
