"""One attempt of a job on Ray: train on a TorchTrainer, evaluate, apply the gate, publish a version.

The attempt runs in the job runner's `AttemptHost` (service/jobs/host.py), which also primes the
node (`prime_node`). Progress flows from rank 0 to a `ProgressBoard` actor
(service/training/progress.py), which the runner polls while it waits.

`train_on_ray` is the single integration point with service/training/ray_train.py.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from ray.actor import ActorHandle

from gnsp_core.data.archives import safe_extract
from gnsp_core.config import TrainConfig
from gnsp_core.data.folders import validate_image_folder
from gnsp_core.methods.registry import uses_reference

from service.jobs.tasks import AttemptOutcome, published_by
from service.training.progress import JobProgress
from service.settings import ServiceSettings
from service.store import ModelStore

# Where each phase of an attempt sits on the job's 0..1 progress bar.
_PHASES = {"queued": (0.0, 0.0), "resuming": (0.0, 0.02), "starting": (0.02, 0.05), "train": (0.05, 0.85),
           "saving": (0.90, 0.92), "done": (0.92, 0.93), "evaluating": (0.93, 0.97), "publishing": (0.97, 0.99)}
_OTHER_PHASE = (0.85, 0.90)  # method phases after training, e.g. the GNSP statistics pass


@dataclass(frozen=True)
class AttemptPlan:
    """Everything an attempt needs, as plain data (paths in the store, never bytes)."""

    task_id: str
    name: str
    config: dict[str, Any]
    upload: str
    base_version: int
    settings: ServiceSettings


def job_fraction(progress: JobProgress) -> float:
    low, high = _PHASES.get(progress.phase, _OTHER_PHASE)
    return low + (high - low) * progress.fraction


def quality_gate(new: float | None, base: float | None, base_version: int, max_drop: float) -> dict[str, Any]:
    """Passed unless held-out accuracy fell by more than `max_drop` points (no held-out set: passed)."""
    passed = new is None or base is None or new >= base - max_drop
    return {"passed": passed, "heldout_accuracy": new, "base_heldout_accuracy": base,
            "base_version": base_version, "max_drop": max_drop}


def train_on_ray(plan: AttemptPlan, store: ModelStore, out_dir: Path, board: ActorHandle | None) -> dict[str, Any]:
    """Learn the task from the base version with service.training.ray_train; returns Ray Train's final metrics.

    The workers get the upload and the base version by their address in the store, never a path
    of this node, and checkpoint into the store: the run is named by the task id there, so a run
    whose training node died, or an attempt after a crash, resumes it on any node."""
    from service.training.ray_train import TrainJob, WorkerResources, free_cpus_per_worker, train_task
    from service.training.stored import StoredUpload, StoredVersion, run_storage

    settings = plan.settings
    config = TrainConfig.from_dict(plan.config)
    reference = settings.reference if uses_reference(config.method) else None
    job = TrainJob(task=StoredUpload(settings.store, plan.upload), config=config,
                   base_state=StoredVersion(settings.store, plan.base_version), reference=reference,
                   checkpoint_every=settings.checkpoint_every, archive_limits=settings.archive_limits(),
                   scratch_dir=settings.work_dir)
    cpus = settings.cpus_per_worker or free_cpus_per_worker(settings.workers)
    resources = WorkerResources(settings.workers, settings.gpus_per_worker, cpus,
                                tuple(sorted(settings.worker_resources.items())))
    storage_path, filesystem = run_storage(store)
    result = train_task(job, storage_path=storage_path, storage_filesystem=filesystem, name=plan.task_id,
                        out_dir=out_dir, resources=resources, max_failures=1, board=board)
    return result.metrics


def execute_attempt(plan: AttemptPlan, board: ActorHandle | None) -> AttemptOutcome:
    """Train, evaluate, gate and publish; a version this job already published is returned as is."""
    from service.training.stored import frozen_outputs_folder
    from service.versions import base_heldout_accuracy, evaluate_version

    settings = plan.settings
    store = ModelStore.open(settings.store)
    published = published_by(store, plan.task_id)
    if published is not None:
        return published
    with tempfile.TemporaryDirectory(prefix=f"gnsp-{plan.task_id}-", dir=settings.scratch()) as scratch_name:
        scratch = Path(scratch_name)
        archive = store.fetch_upload(plan.upload, scratch)
        limits = settings.archive_limits()
        task_dir = validate_image_folder(safe_extract(archive, scratch / "data", limits), limits).root
        train_metrics = train_on_ray(plan, store, scratch / "state", board)
        _phase(board, "evaluating")
        trunk_outputs = frozen_outputs_folder(settings.work_dir)
        with torch_threads(os.cpu_count() or 1):  # training is over: the node's cores are this job's
            metrics = evaluate_version(scratch / "state", task_dir, settings.heldout, trunk_outputs)
            base_acc = base_heldout_accuracy(store, plan.base_version, settings.heldout, scratch / "cache",
                                             trunk_outputs)
        gate = quality_gate(metrics["heldout_accuracy"], base_acc, plan.base_version, settings.max_heldout_drop)
        metrics.update(base_heldout_accuracy=base_acc, **_train_summary(train_metrics))
        _phase(board, "publishing")
        parent = store.manifest(plan.base_version)
        manifest = {"parent": plan.base_version, "task_id": plan.task_id, "task": plan.name,
                    "method": plan.config.get("method"), "tasks": [*parent.get("tasks", []), plan.name],
                    "spec": parent.get("spec"), "metrics": metrics, "gate": gate}
        version = store.publish_version(scratch / "state", manifest)
    return AttemptOutcome(version, metrics, gate)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Torch runs `count` threads for the block. The attempt is a Ray task without CPUs of its own,
    which Ray starts with one thread; once training is over the node's cores are free for it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("step", "loss", "samples_per_s", "train_s", "resumed_from")
    return {k: metrics[k] for k in keys if metrics.get(k) is not None}


def _phase(board: ActorHandle | None, phase: str) -> None:
    if board is not None:
        board.update.remote({"phase": phase, "step": 0, "total": 0, "updated": time.time()})


def prime_node(settings: ServiceSettings) -> dict[str, int]:
    """Compute this node's frozen outputs for the active version and the reference pairs, as a job
    with the service's default method and the model's recommended settings would on first use
    (gnsp_core.trainer.prime_frozen_outputs), and the held-out suite's trunk rows that every
    evaluation reads (service.versions.measure_heldout). Returns the rows computed per part."""
    from gnsp_core.models import recommended_training
    from gnsp_core.models.inference import prepare_image_tower
    from gnsp_core.state import ContinualState
    from gnsp_core.trainer import prime_frozen_outputs
    from service.training.sources import load_reference
    from service.training.stored import frozen_outputs_folder
    from service.versions import load_heldout, load_state_model, measure_heldout

    store = ModelStore.open(settings.store)
    config = TrainConfig.from_dict({**recommended_training(settings.model), "method": settings.default_method})
    folder = frozen_outputs_folder(settings.work_dir)
    with tempfile.TemporaryDirectory(prefix="gnsp-prime-", dir=settings.scratch()) as scratch, \
            torch_threads(os.cpu_count() or 1):
        loaded = load_state_model(ContinualState.load(store.fetch_version(store.active(), Path(scratch))))
        computed = {}
        if settings.reference is not None and uses_reference(config.method):
            computed = prime_frozen_outputs(loaded, config, load_reference(settings.reference), folder)
        prepare_image_tower(loaded.model, loaded.image_size)  # as evaluate_version measures a version
        measure_heldout(loaded, load_heldout(settings.heldout), folder)
    return computed
