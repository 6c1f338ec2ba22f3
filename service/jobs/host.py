"""The job runner's side of an attempt: the long-lived process attempts run in, and how they stop.

Attempts run in an `AttemptHost` actor, not in the job runner's process, for one reason: a running
TorchTrainer cannot be stopped from the outside, but its driver can. A stop request on the job's
board reaches the attempt as Ray's own cancel of a task does (`_thread.interrupt_main`): inside
`fit()`, Ray Train's SIGINT handler aborts the run gracefully (workers stopped, placement group
removed); elsewhere it is a KeyboardInterrupt. Only if that hangs is the host killed.

The host lives on between attempts that succeed: an attempt's driver imports torch, open_clip and
Ray Train (about 4.5 s of a core on two cores) and evaluation reads caches that live in the
process, which a process per attempt paid on every job. After an attempt that did not succeed the
host is killed, whatever that attempt left behind (a half-aborted run's actors end with the process
that owns them; its placement group does not, and is released: service.training.orphans), and the
next attempt starts a new one.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from service.errors import ServiceFault, unwrap
from service.jobs.attempt import AttemptPlan, execute_attempt, job_fraction, prime_node
from service.jobs.tasks import AttemptOutcome, JobCancelled, JobInterrupted
from service.settings import ServiceSettings
from service.training.orphans import release_orphaned_placement_groups
from service.training.progress import JobProgress, interrupted_on_stop_request, open_board

log = logging.getLogger(__name__)
POLL_S = 0.5
WARM_TIMEOUT_S = 300.0
STOP_GRACE_S = 30.0


class AttemptHost:
    """The process that primes the job runner's node, then runs its attempts one after another, on
    that node: a training node lost mid-task takes only Ray Train workers, which Ray Train restarts
    from the checkpoint in the store."""

    def prime(self, settings: ServiceSettings) -> dict[str, int]:
        return prime_node(settings)

    def attempt(self, plan: AttemptPlan, board: ActorHandle) -> AttemptOutcome:
        with interrupted_on_stop_request(board, POLL_S):
            return execute_attempt(plan, board)


class RayTrainRunner:
    """The JobQueue's runner: each attempt a call on the `AttemptHost`. Ray is resolved when the host
    is first needed, not when the runner is built, so building a job queue never starts a Ray."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._host: ActorHandle | None = None

    def start(self) -> None:
        """Start the host's process now, when the node is to be primed (a service, not a test of the
        queue): it imports torch, open_clip and Ray Train (seconds of a core on one thread) while the
        job runner makes version 1. Priming itself waits for that version (`warm`): started beside
        it, it slowed the service's start more than it sped the first job (`gnsp demo`, measured)."""
        if self.settings.prime_node:
            self._running_host()

    def _running_host(self) -> ActorHandle:
        if self._host is None:
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            host = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(AttemptHost)
            self._host = host.options(scheduling_strategy=here).remote()
        return self._host

    def retire_host(self) -> None:
        """Kill the host (the actors its runs own end with it); the next attempt starts a new one.
        The placement group of a run the kill cut short is released here: nothing of Ray's would."""
        host, self._host = self._host, None
        if host is None:
            return
        ray.kill(host)
        released = release_orphaned_placement_groups()
        if released:
            log.warning("released placement groups %s of runs whose process was killed", released)

    def close(self) -> None:
        """The queue stopped: no attempt host waits for a job that will not come."""
        self.retire_host()

    def warm(self) -> None:
        """Prime this node before the first job (`prime_node`) unless settings.prime_node is off;
        bounded, and never fatal."""
        if not self.settings.prime_node:
            return
        ref = self._running_host().prime.remote(self.settings)
        ready, _ = ray.wait([ref], timeout=WARM_TIMEOUT_S)
        try:
            if not ready:
                raise TimeoutError(f"priming the node took over {WARM_TIMEOUT_S:g} s")
            computed = ray.get(ref)
        except BaseException:
            self.retire_host()
            raise
        if any(computed.values()):
            log.info("primed this node's frozen outputs: %s", computed)

    def __call__(self, record: dict[str, Any], should_stop: Callable[[], str | None],
                 report: Callable[[float, str], None]) -> AttemptOutcome:
        plan = AttemptPlan(record["task_id"], record["name"], {**record["config"], "method": record["method"]},
                           record["upload"], record["base_version"], self.settings)
        board = open_board(plan.task_id)
        ray.get(board.reset.remote(0, 1))
        ref = self._running_host().attempt.remote(plan, board)
        try:
            return self._wait(ref, board, should_stop, report)
        except BaseException:
            self.retire_host()
            raise
        finally:
            ray.kill(board)

    def _wait(self, ref: ray.ObjectRef, board: ActorHandle, should_stop: Callable[[], str | None],
              report: Callable[[float, str], None]) -> AttemptOutcome:
        while True:
            ready, _ = ray.wait([ref], timeout=POLL_S)
            try:
                snapshot: JobProgress = ray.get(board.latest.remote(), timeout=5)
                report(job_fraction(snapshot), "starting" if snapshot.phase == "queued" else snapshot.phase)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                pass
            if ready:
                return _result(ref)
            reason = should_stop()
            if reason is not None:
                board.request_stop.remote()
                ray.wait([ref], timeout=STOP_GRACE_S)  # then the host is killed, ended or not
                raise JobCancelled() if reason == "cancel" else JobInterrupted()


def _result(ref: ray.ObjectRef) -> AttemptOutcome:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        raise unwrap(exc) from None
    except ray.exceptions.RayError as exc:  # the host's process died (killed, out of memory)
        raise ServiceFault(f"the training process died: {type(exc).__name__}") from exc
