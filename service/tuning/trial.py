"""One trial of the search: a Tune function trainable that runs a Ray Train job per task.

Ray 2.60 runs Tune over Train as a function trainable that builds and fits a TorchTrainer itself
(`service.training.ray_train.train_task`). The trial requests only 0.01 CPU, so the trainer's workers get the
cores. After each task the trial scores the new state on validation data, then reports the metrics
with a small checkpoint (the next task, the state folder, the accuracies right after learning each
task). A trial restored from that checkpoint continues with the next task; a task interrupted
mid-way resumes from its own Ray Train checkpoint (same run storage and name).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from gnsp_core.config import TrainConfig
from gnsp_core.data import load_task
from gnsp_core.models import ModelSpec, load_model
from gnsp_core.state import ContinualState

from service.training.ray_train import TrainJob, WorkerResources, train_task
from service.tuning.data import TUNING_REFERENCE, validation_reference
from service.tuning.objective import evaluate_state, score

PROGRESS_FILE = "trial_progress.json"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (passed once with tune.with_parameters)."""

    task_folders: list[str]
    """Validation ImageFolders: `train/` is learned, `test/` is the validation part."""
    config: TrainConfig
    model: ModelSpec | None
    base_state: str | None
    baseline_r1: float
    """Reference R@1 of the pre-trained model, the denominator of retention."""
    work_dir: str
    resources: WorkerResources = field(default_factory=WorkerResources)


@dataclass
class TrialProgress:
    next_task: int = 0
    state: str | None = None
    learned_accs: list[float] = field(default_factory=list)
    """Validation accuracy of each task right after it was learned (for forgetting)."""


def trial_config(base: TrainConfig, params: dict[str, float]) -> TrainConfig:
    """The base config with one trial's searched values."""
    return base.replace(projection_threshold=params["threshold"], cd_weight=params["cd_weight"],
                        map_weight=params["map_weight"], lr=params["lr"])


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Learn the tasks one by one; after each, score on validation data and `tune.report`."""
    config = trial_config(setup.config, params)
    progress = _restore(tune.get_checkpoint())
    trial_id = tune.get_context().get_trial_id()
    work = Path(setup.work_dir)
    tasks = [load_task(folder) for folder in setup.task_folders[: progress.next_task]]
    pairs = validation_reference()
    loaded = None
    for index in range(progress.next_task, len(setup.task_folders)):
        tasks.append(load_task(setup.task_folders[index]))  # a broken folder fails here, before a trainer starts
        base = progress.state or setup.base_state
        job = TrainJob(task=setup.task_folders[index], config=config, base_state=base,
                       model=None if base else setup.model, reference=TUNING_REFERENCE)
        run_name = f"{trial_id}-t{index}"
        started = time.perf_counter()
        result = train_task(job, storage_path=str(work / "runs"), name=run_name,
                            out_dir=work / trial_id / f"after_{index}", resources=setup.resources)
        shutil.rmtree(work / "runs" / run_name, ignore_errors=True)  # the state was copied out
        state = ContinualState.load(result.state_dir)
        loaded = loaded or load_model(state.spec)
        accs, r1 = evaluate_state(loaded, state, tasks, pairs)
        metrics = score(accs, progress.learned_accs, r1, setup.baseline_r1).as_metrics()
        previous = progress.state
        progress = TrialProgress(index + 1, str(result.state_dir), [*progress.learned_accs, accs[-1]])
        _report({**metrics, "tasks_done": index + 1, "task": tasks[index].name,
                 "task_s": time.perf_counter() - started}, progress)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)  # the next task starts from the new state


def _report(metrics: dict[str, Any], progress: TrialProgress) -> None:
    with tempfile.TemporaryDirectory(prefix="gnsp-trial-") as folder:
        (Path(folder) / PROGRESS_FILE).write_text(json.dumps(progress.__dict__))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _restore(checkpoint: tune.Checkpoint | None) -> TrialProgress:
    if checkpoint is None:
        return TrialProgress()
    with checkpoint.as_directory() as folder:
        return TrialProgress(**json.loads((Path(folder) / PROGRESS_FILE).read_text()))
