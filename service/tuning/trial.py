"""One trial of the search: a Tune function trainable that runs a Ray Train job per task.

Ray 2.60 runs Tune over Train as a function trainable that builds and fits a TorchTrainer itself
(`service.training.ray_train.train_task`). The trial requests only 0.01 CPU, so the trainer's workers get the
cores. After each task the trial scores the new state on validation data, then reports the metrics
with a small checkpoint (the next task, where the state is, the accuracies right after learning each
task). A trial restored from that checkpoint continues with the next task; a task interrupted
mid-way resumes from its own Ray Train checkpoint (same run storage and name).

Nothing a trial reads or writes is a path of another node: the validation tasks and the base
version come by their address in the search's folder and the store, and are fetched into this
node's scratch; each task's run, and so the state after it (its final checkpoint), is kept in the
search's `work/runs/`, so a trial restored on another node continues from it.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from gnsp_core.config import TrainConfig
from gnsp_core.data import load_task
from gnsp_core.data.reference import CaptionPairs
from gnsp_core.models import LoadedModel, ModelSpec, load_model
from gnsp_core.state import ContinualState

from service.training.ray_train import TrainJob, WorkerResources, train_task
from service.training.stored import StoredState, StoredUpload, StoredVersion, local_source, scratch_root
from service.tuning.data import TUNING_REFERENCE, validation_reference
from service.tuning.folder import SearchFolder
from service.tuning.objective import evaluate_state, score

PROGRESS_FILE = "trial_progress.json"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (passed once with tune.with_parameters)."""

    tasks: list[str | StoredUpload]
    """Validation ImageFolders (`train/` is learned, `test/` is the validation part): folders, or
    archives in the search's folder when the search lives in an object store."""
    config: TrainConfig
    model: ModelSpec | None
    base_state: str | StoredVersion | None
    baseline_r1: float
    """Reference R@1 of the pre-trained model, the denominator of retention."""
    work: SearchFolder
    """Where trials keep their task runs (`runs/<trial>-t<i>`), whose final checkpoints are their states."""
    resources: WorkerResources = field(default_factory=WorkerResources)
    scratch_dir: str | None = None
    """Node-local scratch for fetched inputs (None: the system temp dir)."""


@dataclass
class TrialProgress:
    next_task: int = 0
    state: str | None = None
    """The state after the last learned task: its place in the store of `TrialSetup.work`."""
    learned_accs: list[float] = field(default_factory=list)
    """Validation accuracy of each task right after it was learned (for forgetting)."""


def trial_config(base: TrainConfig, params: dict[str, float]) -> TrainConfig:
    """The base config with one trial's searched values."""
    return base.replace(projection_threshold=params["threshold"], cd_weight=params["cd_weight"],
                        map_weight=params["map_weight"], lr=params["lr"])


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Learn the tasks one by one; after each, score on validation data and `tune.report`.

    Each task's fetched inputs live in a scratch folder that is gone before its report: Tune may
    stop the trial at any report (ASHA at a rung, every trial at the last task) and end its process
    before the function returns, which would leave a folder spanning the report on the node.
    """
    config = trial_config(setup.config, params)
    progress = _restore(tune.get_checkpoint())
    trial_id = tune.get_context().get_trial_id()
    pairs = validation_reference()
    for index in range(progress.next_task, len(setup.tasks)):
        started = time.perf_counter()
        metrics, progress = _learn_task(index, config, progress, setup, trial_id, pairs)
        _report({**metrics, "task_s": time.perf_counter() - started}, progress)
        if index > 0:
            setup.work.delete(f"runs/{trial_id}-t{index - 1}")  # the next task starts from the new state


def _learn_task(index: int, config: TrainConfig, progress: TrialProgress, setup: TrialSetup, trial_id: str,
                pairs: CaptionPairs) -> tuple[dict[str, Any], TrialProgress]:
    """Train task `index` from the last state, score every task so far: the metrics and the new progress."""
    storage_path, filesystem = setup.work.storage("runs")
    with tempfile.TemporaryDirectory(prefix=f"gnsp-{trial_id}-", dir=scratch_root(setup.scratch_dir)) as name:
        scratch = Path(name)
        # a broken task fails here, before a trainer starts
        tasks = [load_task(local_source(setup.tasks[i], scratch / f"in{i}"), work_dir=scratch)
                 for i in range(index + 1)]
        base = StoredState(setup.work.store.uri, progress.state) if progress.state else setup.base_state
        job = TrainJob(task=setup.tasks[index], config=config, base_state=base,
                       model=None if base else setup.model, reference=TUNING_REFERENCE,
                       scratch_dir=setup.scratch_dir)
        result = train_task(job, storage_path=storage_path, storage_filesystem=filesystem,
                            name=f"{trial_id}-t{index}", resources=setup.resources)
        with result.checkpoint.as_directory() as folder:
            state = ContinualState.load(folder)
            accs, r1 = evaluate_state(_evaluation_model(state.spec), state, tasks, pairs)
    metrics = score(accs, progress.learned_accs, r1, setup.baseline_r1).as_metrics()
    stored = StoredState.of_checkpoint(setup.work.store, result.checkpoint.path)
    done = TrialProgress(index + 1, stored.rel, [*progress.learned_accs, accs[-1]])
    return {**metrics, "tasks_done": index + 1, "task": tasks[index].name}, done


@functools.lru_cache(maxsize=1)
def _evaluation_model(spec: ModelSpec) -> LoadedModel:
    """The architecture every state of a trial is scored on (each state's weights are loaded into it)."""
    return load_model(spec)


def _report(metrics: dict[str, Any], progress: TrialProgress) -> None:
    with tempfile.TemporaryDirectory(prefix="gnsp-trial-") as folder:
        (Path(folder) / PROGRESS_FILE).write_text(json.dumps(progress.__dict__))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _restore(checkpoint: tune.Checkpoint | None) -> TrialProgress:
    if checkpoint is None:
        return TrialProgress()
    with checkpoint.as_directory() as folder:
        return TrialProgress(**json.loads((Path(folder) / PROGRESS_FILE).read_text()))
