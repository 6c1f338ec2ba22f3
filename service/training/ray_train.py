"""Learn one task with Ray Train: N workers run `gnsp_core.trainer.learn_task` under DDP.

Everything a worker needs travels as a `TrainJob` of specs and store addresses; each worker
fetches the dataset and the base version into its node-local scratch (service/training/stored.py)
and loads the model, task and reference data itself. Gradients are averaged by DDP (gloo on CPU,
nccl on GPU) and the GNSP projector statistics are summed with `torch.distributed.all_reduce`, so N workers collect the
same statistics as one process. Rank 0 reports a checkpoint (model, optimiser, scheduler, method
state, step) every `checkpoint_every` steps into `RunConfig(storage_path, name)`; a worker group
that fails restarts from the latest one (`FailureConfig(max_failures)`), and so does a whole run
started again with the same storage path and name. The last checkpoint is the new ContinualState
folder itself, which `train_task` copies to `out_dir`.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed
from ray.actor import ActorHandle
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from gnsp_core.config import TrainConfig
from gnsp_core.data import load_task
from gnsp_core.data.archives import ArchiveLimits
from gnsp_core.errors import ConfigError, GnspError
from gnsp_core.models import LoadedModel, ModelSpec, load_model
from gnsp_core.state import ContinualState
from gnsp_core.task_context import Distributed
from gnsp_core.trainer import learn_task

from service.training.cluster import sigint_handler_restored
from service.training.local_run import LocalCheckpoints, reserved
from service.training.progress import BoardReporter
from service.training.run_snapshot import CHECKPOINT_FILE as TRAIN_STATE_FILE
from service.training.run_snapshot import recover_torn_snapshot
from service.training.stored import (StoredState, StoredUpload, StoredVersion, frozen_outputs_folder, local_source,
                                     scratch_root)
from service.training.sources import check_reference_spec, load_reference

FINISHED = "finished"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrashDrill:
    """Failure drill (tests, chaos runs): `rank` exits hard once, right after the first checkpoint at
    or past `after_step` is committed, unless `marker` exists; the marker makes it happen only once."""

    rank: int
    after_step: int
    marker: str


@dataclass(frozen=True)
class TrainJob:
    """One task to learn, as specs and addresses only, so it is cheap to ship and to retry."""

    task: str | StoredUpload
    """A task source for gnsp_core.data.load_task (built-in name, folder, archive, mtil:...), or an
    uploaded archive in the store, which each worker fetches into its own scratch."""
    config: TrainConfig
    base_state: str | StoredVersion | StoredState | None = None
    """The ContinualState to start from (version N), a folder, or a version or a search trial's state in
    the store; its model spec is used."""
    model: ModelSpec | None = None
    """Start from this model's initial weights instead (the first task of a sequence)."""
    reference: str | None = None
    """Reference spec (see service.training.sources), for methods with CD/MAP or distillation losses."""
    checkpoint_every: int = 50
    drill: CrashDrill | None = None
    archive_limits: ArchiveLimits = ArchiveLimits()
    """Bounds on an archive task source as each worker unpacks it (the service passes its own)."""
    scratch_dir: str | None = None
    """Node-local scratch on each worker's node, where stored inputs are fetched (None: the system temp dir)."""

    def __post_init__(self) -> None:
        if (self.base_state is None) == (self.model is None):
            raise ConfigError("a TrainJob starts from exactly one of base_state or model")
        if self.checkpoint_every < 1:
            raise ConfigError("checkpoint_every must be >= 1")
        check_reference_spec(self.reference)


@dataclass(frozen=True)
class WorkerResources:
    workers: int = 1
    """Ray Train workers; 0: the caller's own process trains (Ray Train's local mode, see
    service.training.local_run), on the resources of one worker, reserved for the run."""
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    extra: tuple[tuple[str, float], ...] = ()
    """Custom Ray resources each worker asks for besides CPU and GPU, e.g. (("trainer", 1),): they
    place the workers on the nodes that offer them."""

    @property
    def torch_threads(self) -> int:
        """Ray starts workers with one torch thread; a worker given N CPUs should use them."""
        return max(1, int(self.cpus_per_worker))

    @property
    def per_worker(self) -> dict[str, float]:
        resources = {**dict(self.extra), "CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            resources["GPU"] = self.gpus_per_worker
        return resources

    def scaling_config(self) -> ScalingConfig:
        if self.workers == 0:
            return ScalingConfig(num_workers=0)
        return ScalingConfig(num_workers=self.workers, use_gpu=self.gpus_per_worker > 0,
                             resources_per_worker=self.per_worker)


def free_cpus_per_worker(workers: int) -> float:
    """The cluster's CPUs not held by anything now (Serve replicas, other actors), shared by `workers`."""
    free = ray.available_resources().get("CPU", 1.0)
    return max(1.0, float(int(free // max(workers, 1))))


@dataclass
class TaskResult:
    state_dir: Path | None
    """Where the new ContinualState was copied (None when no out_dir was given)."""
    checkpoint: Checkpoint
    """The final checkpoint in run storage: the ContinualState folder itself."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Rank 0's final metrics: step, total, loss, samples_per_s, resumed_from, train_s."""


def train_task(
    job: TrainJob,
    *,
    storage_path: str,
    name: str,
    out_dir: str | Path | None = None,
    resources: WorkerResources = WorkerResources(),
    max_failures: int = 1,
    board: ActorHandle | None = None,
    storage_filesystem: pafs.FileSystem | None = None,
) -> TaskResult:
    """Run `job` on a TorchTrainer; re-running with the same storage_path and name resumes it.

    `storage_filesystem` puts the run (its checkpoints) on that filesystem, e.g. the store's object
    store (service.training.stored.run_storage), so a worker on any node can write and resume it.

    With `resources.workers == 0` this process trains (service.training.local_run): no worker
    group to start, checkpoints in the same storage, no restarts (`max_failures` does not apply).

    Raises the workers' own GnspError (bad dataset, bad state, ...) when that is why the run failed.
    """
    in_process = resources.workers == 0
    local = LocalCheckpoints(storage_path, name, storage_filesystem) if in_process else None
    fallback = None if in_process else recover_torn_snapshot(storage_path, name, storage_filesystem)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"job": seal(job), "board": board, "threads": resources.torch_threads,
                           "fallback": fallback, "local": local},
        scaling_config=resources.scaling_config(),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    try:
        with sigint_handler_restored(), reserved(resources.per_worker) if in_process else nullcontext():
            result = trainer.fit()
    except ray.train.WorkerGroupError as exc:
        raise _user_error(exc) or exc
    state_dir = None
    if out_dir is not None:
        with result.checkpoint.as_directory() as folder:
            state_dir = ContinualState.load(folder).save(out_dir)
    return TaskResult(state_dir, result.checkpoint, dict(result.metrics or {}))


def seal(job: TrainJob) -> bytes:
    """The job as bytes for the train loop's config. Ray Train's controller keeps that config in its
    run context and unpickles it; a TrainJob there would import this module and its stack (torch,
    open_clip, timm, transformers: about 6 s of CPU) into a process that only schedules workers,
    before any worker starts, on every job. Only the workers open it."""
    return pickle.dumps(job)


def _user_error(exc: ray.train.WorkerGroupError) -> GnspError | None:
    """The first worker failure that is a user mistake, so callers see its clear message."""
    for error in exc.worker_failures.values():
        if isinstance(error, GnspError):
            return error
    return None


def _train_worker(loop_config: dict[str, Any]) -> None:
    """Per-worker loop: resume from the latest checkpoint, learn the task, report the new state."""
    job: TrainJob = pickle.loads(loop_config["job"])
    torch.set_num_threads(min(loop_config["threads"], os.cpu_count() or 1))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    local: LocalCheckpoints | None = loop_config["local"]
    reporter = _Reporter(rank, BoardReporter(loop_config["board"] if rank == 0 else None), job.drill, local)
    resume = _resume_from(local.latest() if local else ray.train.get_checkpoint(), loop_config["fallback"])
    if resume == FINISHED:
        return  # the run had already finished: its final checkpoint stands
    resumed_from = resume["step"] if resume else None
    reporter.board.send(phase="starting", resumed_from=resumed_from)
    device = ray.train.torch.get_device()
    config = job.config.replace(device=str(device)) if job.config.device == "auto" else job.config
    distributed = Distributed(rank, world_size, _sum_across_workers if world_size > 1 else None,
                              _wrap_ddp if world_size > 1 else None)
    started = time.perf_counter()
    # Node-local: what the store holds for this job is fetched here, an archive is unpacked here.
    with tempfile.TemporaryDirectory(prefix="gnsp-task-", dir=scratch_root(job.scratch_dir)) as scratch_name:
        scratch = Path(scratch_name)
        state, loaded = _starting_point(local_source(job.base_state, scratch / "base"), job.model, device)
        task = load_task(local_source(job.task, scratch / "upload"), work_dir=scratch, limits=job.archive_limits)
        new_state = learn_task(
            state, loaded, task, config, reference=load_reference(job.reference),
            progress=reporter.board, distributed=distributed, resume=resume,
            on_checkpoint=reporter.checkpoint, checkpoint_every=job.checkpoint_every,
            frozen_outputs=frozen_outputs_folder(job.scratch_dir),
        )
    reporter.final(new_state, resumed_from, time.perf_counter() - started)


def _starting_point(base_state: str | None, model: ModelSpec | None,
                    device: torch.device) -> tuple[ContinualState, LoadedModel]:
    if base_state is not None:
        state = ContinualState.load(base_state)
        return state, load_model(state.spec, device)
    loaded = load_model(model, device)
    return ContinualState.initial(loaded.model, model), loaded


def _sum_across_workers(tensor: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def _wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """DDP on the model learn_task already placed on this worker's device."""
    return ray.train.torch.prepare_model(model, move_to_device=False)


def _resume_from(checkpoint: Checkpoint | None, fallback: Checkpoint | None) -> dict[str, Any] | str | None:
    """Ray Train's latest checkpoint, else the one a torn run snapshot left (run_snapshot.py), which
    a crash may have cut short: then the task starts again."""
    if checkpoint is not None or fallback is None:
        return _read_checkpoint(checkpoint)
    try:
        return _read_checkpoint(fallback)
    except Exception as exc:
        log.warning("the checkpoint left by a crash is unreadable (%s); the task starts again", exc)
        return None


def _read_checkpoint(checkpoint: Checkpoint | None) -> dict[str, Any] | str | None:
    """The training state to resume from; FINISHED when the checkpoint is the final ContinualState."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        if (Path(folder) / "state.json").is_file():
            return FINISHED
        return torch.load(Path(folder) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)


class _Reporter:
    """Every rank calls ray.train.report the same number of times (it is a barrier); rank 0 attaches
    the checkpoint and the metrics. In process (`local`), the checkpoint is first copied into the
    run storage, which Ray Train's local mode does not do."""

    def __init__(self, rank: int, board: BoardReporter, drill: CrashDrill | None,
                 local: LocalCheckpoints | None = None) -> None:
        self.rank, self.board, self.drill, self.local = rank, board, drill, local

    def metrics(self) -> dict[str, Any]:
        last = self.board.last
        if last is None:
            return {}
        return {"step": last.step, "total": last.total, "loss": last.loss, "samples_per_s": last.samples_per_s}

    def checkpoint(self, train_state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="gnsp-ckpt-") as folder:
            checkpoint = None
            if self.rank == 0:
                torch.save(train_state, Path(folder) / TRAIN_STATE_FILE)
                checkpoint = (self.local.save_step(folder, train_state["step"]) if self.local
                              else Checkpoint.from_directory(folder))
            ray.train.report({**self.metrics(), "step": train_state["step"]}, checkpoint=checkpoint)
        self._maybe_crash(train_state["step"])

    def final(self, state: ContinualState, resumed_from: int | None, seconds: float) -> None:
        self.board.send(phase="saving")
        metrics = {**self.metrics(), "resumed_from": resumed_from, "train_s": seconds}
        with tempfile.TemporaryDirectory(prefix="gnsp-state-") as folder:
            checkpoint = None
            if self.rank == 0:
                saved = state.save(Path(folder) / "state")
                checkpoint = self.local.save_final(saved) if self.local else Checkpoint.from_directory(saved)
            ray.train.report(metrics, checkpoint=checkpoint)
        self.board.send(phase="done")

    def _maybe_crash(self, step: int) -> None:
        drill = self.drill
        if drill is None or drill.rank != self.rank or step < drill.after_step or os.path.exists(drill.marker):
            return
        Path(drill.marker).write_text(str(step))
        # Wait until the controller has committed this checkpoint, so the restart resumes from it.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        os._exit(1)
