"""Ray Tune: search GNSP's null-space threshold and loss weights for the best stability-plasticity trade-off.

    outcome = run_tune_job(TuneRequest(tasks=["digits", "animals"], out_dir="out/tune", trials=12))
    outcome.best_config  # a TrainConfig; also written to out/tune/best.json

Each trial (service.tuning.trial) learns the task sequence with Ray Train and reports the
validation objective (service.tuning.objective) after every task. Optuna's TPE proposes the values
(`searcher="random"` is the documented alternative), starting from the paper's recipe so the
table always shows whether the search beat it. ASHA stops trials that trail the others at the
same task; Optuna is told such trials were pruned, so TPE never compares an objective over one
task with one over the whole sequence. The Tune run is named by the job id and stored in the
search's folder (service.tuning.folder: a local `--out` folder, or `<store>/tune/<job_id>/` for a
REST search, through the store's own pyarrow filesystem), under `ray/`;
`run_tune_job(TuneRequest.load(out_dir), resume=True)` (`gnsp tune --resume`) restores it with
`Tuner.restore`: unfinished trials continue, failed ones retry from their last finished task, on
any node. Within a run, a trial that fails (its node lost, most often) is retried
`request.trial_retries` times the same way, from the checkpoint it reported in the folder.
Output files: service.tuning.report.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from gnsp_core.config import TrainConfig
from gnsp_core.errors import ConfigError
from gnsp_core.models import load_model
from gnsp_core.state import ContinualState

from service.errors import user_reason
from service.training.cluster import quiet_ray_warnings, ray_cluster
from service.training.ray_train import WorkerResources
from service.training.stored import StoredVersion, scratch_root
from service.tuning.data import stored_validation_tasks, validation_reference
from service.tuning.folder import SearchFolder
from service.tuning.objective import OBJECTIVE, retrieval_r1
from service.tuning.report import (best_row, plot_trials, read_results, sort_rows, trial_row, write_best, write_status,
                          write_table)
from service.tuning.request import SearchSpace, TuneRequest
from service.tuning.stopping import StopRequested, search_board, was_stopped
from service.tuning.trial import TrialSetup, run_trial

TRIAL_CPU = 0.01
"""A trial only drives its TorchTrainer; the trainer's workers hold the cores."""

log = logging.getLogger("gnsp.tune")

__all__ = ["TuneOutcome", "TuneRequest", "SearchSpace", "read_results", "run_tune_job", "search_space"]


@dataclass
class TuneOutcome:
    folder: SearchFolder
    rows: list[dict[str, Any]]
    """The trials table, best first."""
    best: dict[str, Any] | None
    """The best complete trial's row (None when no trial learned every task)."""
    best_config: TrainConfig | None
    stopped: bool = False
    """The search was asked to stop (service.tuning.stopping) and ended before its trials did."""


def search_space(space: SearchSpace) -> dict[str, Any]:
    return {"threshold": tune.loguniform(*space.threshold), "cd_weight": tune.uniform(*space.cd_weight),
            "map_weight": tune.uniform(*space.map_weight), "lr": tune.loguniform(*space.lr)}


class SequenceOptunaSearch(OptunaSearch):
    """OptunaSearch that reports a trial stopped before the last task as pruned, not complete.

    Its last objective covers fewer tasks (less to forget), so as a complete value it would
    mislead TPE; as pruned, Optuna ranks it below every trial that finished, by its intermediate values.
    """

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_tasks = num_tasks

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # A failed trial that `resume` retries was already told to Optuna (as failed): skip it.
        if trial_id not in self._completed_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        if result and not error and result.get("tasks_done", self.num_tasks) < self.num_tasks:
            result = {k: v for k, v in result.items() if k != self.metric}
        super().on_trial_complete(trial_id, result, error)


class LiveTable(tune.Callback):
    """Rewrites the trials table on every result, so a running search can be watched (and polled),
    and logs each result to the `gnsp.tune` logger. Tune pickles callbacks with the run, so what
    is shown is left to the logging setup of the process that runs (or resumes) the search."""

    def __init__(self, folder: SearchFolder, num_tasks: int) -> None:
        self.folder, self.num_tasks = folder, num_tasks

    def rows(self, trials: list, latest: tuple | None = None) -> list[dict[str, Any]]:
        """Rows from each trial's last result; `latest` (trial, result): one Tune has not stored yet."""
        def metrics(t) -> dict:
            return latest[1] if latest and t is latest[0] else t.last_result or {}

        return [trial_row(t.trial_id, t.config, metrics(t), t.status.lower(), self.num_tasks) for t in trials]

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        write_table(self.rows(trials, (trial, result)), self.folder)
        p = trial.config
        log.info(f"trial {trial.trial_id} task {result['tasks_done']}/{self.num_tasks} ({result['task']}): "
                 f"ρ={p['threshold']:.3f} CD={p['cd_weight']:.2f} MAP={p['map_weight']:.2f} lr={p['lr']:.1e} -> "
                 f"seen acc {result['seen_acc']:.1f}%, forgetting {result['forgetting']:.1f}, "
                 f"retention {result['retention']:.3f}, objective {result[OBJECTIVE]:.3f}")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        log.warning(f"trial {trial.trial_id} failed (its node may be gone); it restarts from its last finished task")

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        write_table(self.rows(trials), self.folder)
        log.warning(f"trial {trial.trial_id} failed; `gnsp tune --resume` retries it")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        write_table(self.rows(trials), self.folder)


def run_tune_job(request: TuneRequest, *, resume: bool = False, address: str | None = None) -> TuneOutcome:
    """Run (or with `resume`, continue) a search; blocks until it ends. Starts a private local Ray
    unless one is running or `address` names a cluster. Status goes to the folder's status.json."""
    out = request.folder()
    if not resume and out.exists("ray"):
        raise ConfigError(f"{out} already holds a search: resume it with `gnsp tune --resume --out {out}` "
                          "or choose a new --out folder")
    quiet_ray_warnings()
    # Each trial reports a checkpoint only once per task, so Tune's snapshot-per-checkpoint is cheap here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    request.save()
    # One logical CPU more than the cores holds the trials' 0.01-CPU drivers, so N cores run N trials.
    with ray_cluster(address, num_cpus=(os.cpu_count() or 1) + 1):
        write_status(out, "running")
        try:
            outcome = _search(request, resume)
        except KeyboardInterrupt:
            write_status(out, "cancelled", "interrupted; `gnsp tune --resume` continues the search")
            raise
        except Exception as exc:
            write_status(out, "failed", user_reason(exc))  # the detail goes on with the exception
            raise
    write_status(out, *_final_status(outcome, request.trials))
    return outcome


def _final_status(outcome: TuneOutcome, trials: int) -> tuple[str, str | None]:
    """cancelled (interrupted or stopped), failed (trials failed and none finished), else succeeded."""
    if outcome.stopped:
        return "cancelled", "stopped on request"
    failed = sum(r["status"] == "error" for r in outcome.rows)
    if sum(r["status"] in ("complete", "stopped") for r in outcome.rows) + failed < trials:
        return "cancelled", "interrupted; `gnsp tune --resume` continues the search"
    note = f"{failed} of {trials} trials failed; `gnsp tune --resume` retries them" if failed else None
    return ("failed" if outcome.best is None and failed else "succeeded"), note


def _search(request: TuneRequest, resume: bool) -> TuneOutcome:
    out = request.folder()
    with tempfile.TemporaryDirectory(prefix="gnsp-tune-", dir=scratch_root(request.scratch_dir)) as scratch:
        tasks = stored_validation_tasks(request.tasks, out, request.val_fraction, request.max_train_per_class,
                                        Path(scratch))
        base = StoredVersion(request.store, request.base_version) if request.base_version is not None \
            else request.base_state
        baseline = _baseline_r1(request, out, base, Path(scratch))
    setup = TrialSetup(tasks, request.config, None if base else request.model, base, baseline, out.child("work"),
                       WorkerResources(request.workers, request.gpus_per_worker,
                                       extra=tuple(sorted(request.worker_resources.items()))), request.scratch_dir)
    with search_board(request.job_id) as board:
        _tuner(request, setup, len(tasks), resume).fit()
        stopped = was_stopped(board)
    rows = sort_rows(out.read_json("trials.json"))
    best = best_row(rows)
    write_table(rows, out)
    plot_trials(rows, out)
    config = write_best(best, request.config, out) if best is not None else None
    if not any(r["status"] == "error" for r in rows):
        out.delete("work")  # trial states: only a failed trial's resume needs them
    return TuneOutcome(out, rows, best, config, stopped)


def _tuner(request: TuneRequest, setup: TrialSetup, num_tasks: int, resume: bool) -> tune.Tuner:
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": TRIAL_CPU})
    storage_path, filesystem = request.folder().storage("ray")
    name = f"tune-{request.job_id}"
    path = f"{storage_path}/{name}"
    if resume and tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem)
    scheduler = ASHAScheduler(time_attr="tasks_done", max_t=num_tasks, grace_period=1, reduction_factor=2)
    return tune.Tuner(
        trainable,
        param_space=search_space(request.space),
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", num_samples=request.trials,
                                    search_alg=_searcher(request, num_tasks), scheduler=scheduler,
                                    max_concurrent_trials=_max_concurrent(request)),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem, verbose=0,
                                  stop=StopRequested(request.job_id),
                                  callbacks=[LiveTable(request.folder(), num_tasks)],
                                  failure_config=tune.FailureConfig(max_failures=request.trial_retries),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )


def _searcher(request: TuneRequest, num_tasks: int):
    first = [request.space.first_point(request.config.lr)]
    if request.searcher == "random":
        return BasicVariantGenerator(points_to_evaluate=first, random_state=request.seed)
    import optuna

    # TPE models the results once a few trials are in; Optuna's default of 10 random ones is most of a small budget.
    sampler = optuna.samplers.TPESampler(seed=request.seed, n_startup_trials=max(2, min(10, request.trials // 3)))
    return SequenceOptunaSearch(num_tasks, sampler=sampler, points_to_evaluate=first)


def _max_concurrent(request: TuneRequest) -> int:
    if request.max_concurrent:
        return request.max_concurrent
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // (request.workers + TRIAL_CPU))
    if request.gpus_per_worker:
        fits = min(fits, int(resources.get("GPU", 0) // (request.workers * request.gpus_per_worker)))
    for name, amount in request.worker_resources.items():
        fits = min(fits, int(resources.get(name, 0) // (request.workers * amount)))
    return max(1, fits)


def _baseline_r1(request: TuneRequest, out: SearchFolder, base: str | StoredVersion | None, scratch: Path) -> float:
    """Reference R@1 of the pre-trained model (the base state's own model, if any); cached in the folder."""
    if isinstance(base, StoredVersion):
        base = base.fetch(scratch)
    spec = ContinualState.load(base).spec if base else request.model
    cached = out.read_json("baseline.json")
    if cached is not None and cached["spec"] == spec.to_dict():
        return cached["r1"]
    r1 = retrieval_r1(load_model(spec), validation_reference())
    out.write_text("baseline.json", json.dumps({"spec": spec.to_dict(), "r1": r1}))
    return r1
