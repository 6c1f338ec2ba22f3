"""Learn a sequence of tasks, one Ray Train run per task, resumable at any point.

The output folder is the sequence's whole record:

    out_dir/progress.json                 the sequence and which tasks are done (written atomically)
    out_dir/after_<i>_<task>/             the ContinualState after task i (version i+1)
    out_dir/runs/<job>-after_<i>_<task>/  Ray Train run storage: checkpoints of the running task

Run it again with the same arguments after an interruption and finished tasks are skipped, while
the task that was running resumes from its last checkpoint (same run storage path and name).
Appending tasks to the list continues a finished sequence.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import ray

from gnsp_core.atomic_files import write_json_atomic
from gnsp_core.config import TrainConfig
from gnsp_core.data.sources import source_folder_name
from gnsp_core.errors import ConfigError
from gnsp_core.models import ModelSpec
from gnsp_core.schedules import Schedule

from service.training.cluster import ray_cluster
from service.training.naming import run_name
from service.training.progress import JobProgress, open_board, watch_board
from service.training.sources import task_source
from service.training.ray_train import TaskResult, TrainJob, WorkerResources, train_task

PROGRESS_FILE = "progress.json"
FORMAT_VERSION = 1


@dataclass
class SequenceResult:
    state_dirs: list[Path]
    """ContinualState folder after each task, in order."""
    trained: list[int]
    """Indices of the tasks this call trained (the others were already done)."""


def learn_sequence(
    task_sources: Sequence[str],
    out_dir: str | Path,
    model: ModelSpec,
    config: TrainConfig,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
    progress: Callable[[JobProgress], None] | None = None,
    reference: str | None = None,
    checkpoint_every: int = 50,
    max_failures: int = 1,
    storage_path: str | None = None,
    schedule: Schedule | None = None,
) -> SequenceResult:
    """Learn `task_sources` in order with `workers` Ray Train workers, continuing where a previous
    call with the same out_dir stopped.

    `storage_path` (a local folder or a cloud URI; default out_dir/runs) holds the mid-task
    checkpoints; `address` joins an existing Ray cluster instead of starting a local one. A
    `schedule` gives each task its own learning rate and steps, found by the task's name (the
    dataset of an `mtil:` source, else the folder or archive name); every task needs a row.
    """
    out_dir = Path(out_dir).resolve()
    task_sources = [task_source(s) for s in task_sources]
    configs = [schedule.config_for(config, source_folder_name(s)) if schedule else config for s in task_sources]
    record = _open_record(out_dir, task_sources, model, config, reference, schedule)
    job_id = run_name(out_dir)
    storage = storage_path or str(out_dir / "runs")
    local_cpus = os.cpu_count() or 1
    resources = WorkerResources(workers, gpus_per_worker, 1.0 if address else max(1.0, float(local_cpus // workers)))
    trained: list[int] = []
    if len(record["completed"]) >= len(task_sources):
        return SequenceResult([out_dir / c["state"] for c in record["completed"]], trained)
    with ray_cluster(address, num_cpus=max(os.cpu_count() or 1, workers)):
        board = open_board(job_id)
        try:
            for index in range(len(record["completed"]), len(task_sources)):
                source, name = task_sources[index], state_folder_name(index, task_sources[index])
                base = str(out_dir / record["completed"][-1]["state"]) if index else None
                job = TrainJob(task=source, config=configs[index], base_state=base, model=None if base else model,
                               reference=reference, checkpoint_every=checkpoint_every)
                ray.get(board.reset.remote(index, len(task_sources)))
                with watch_board(board, progress):
                    result = train_task(job, storage_path=storage, name=f"{job_id}-{name}", out_dir=out_dir / name,
                                        resources=resources, max_failures=max_failures, board=board)
                _complete(out_dir, record, source, name, result)
                _drop_local_run(storage, f"{job_id}-{name}")
                trained.append(index)
        finally:
            ray.kill(board)
    return SequenceResult([out_dir / c["state"] for c in record["completed"]], trained)


def state_folder_name(index: int, source: str) -> str:
    """`after_<i>_<task>`, with the task source reduced to a safe folder name."""
    return f"after_{index}_{source_folder_name(source)}"


def _open_record(out_dir: Path, tasks: list[str], model: ModelSpec, config: TrainConfig,
                 reference: str | None, schedule: Schedule | None) -> dict[str, Any]:
    """Load progress.json (checking it describes the same sequence) or start a new one."""
    fresh = {"format": FORMAT_VERSION, "tasks": tasks, "model": model.to_dict(), "config": config.to_dict(),
             "reference": reference, "schedule": schedule.to_dict() if schedule else None, "completed": [],
             "status": "running"}
    path = out_dir / PROGRESS_FILE
    if not path.is_file():
        write_json_atomic(path, fresh)
        return fresh
    record = json.loads(path.read_text())
    done = [c["task"] for c in record["completed"]]
    differs = [k for k in ("model", "config", "reference", "schedule") if record.get(k) != fresh[k]]
    if tasks[: len(done)] != done:
        differs.append(f"tasks (done so far: {done})")
    if differs:
        raise ConfigError(f"{out_dir} holds a different sequence: its {', '.join(differs)} differ; "
                          "continue it with the same arguments, or use a new output folder")
    record.update(tasks=tasks, status="running")
    write_json_atomic(path, record)
    return record


def _complete(out_dir: Path, record: dict[str, Any], source: str, name: str, result: TaskResult) -> None:
    record["completed"].append({"task": source, "state": name, "metrics": result.metrics, "finished": time.time()})
    if len(record["completed"]) == len(record["tasks"]):
        record["status"] = "succeeded"
    write_json_atomic(out_dir / PROGRESS_FILE, record)


def _drop_local_run(storage: str, name: str) -> None:
    """A finished task's checkpoints are no longer needed once its state is in out_dir (local storage only)."""
    if "://" not in storage:
        shutil.rmtree(Path(storage) / name, ignore_errors=True)
