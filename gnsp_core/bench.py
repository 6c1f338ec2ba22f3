"""`gnsp bench`: several methods over one task sequence, with held-out evaluation sets.

Every method starts from the same pre-trained weights; after each task the whole accuracy row is
measured (all tasks, then the held-out sets) and the modality gap on the first held-out set.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from gnsp_core.bench_stats import aggregate_runs
from gnsp_core.config import TrainConfig
from gnsp_core.data.samples import Task
from gnsp_core.evaluation import accuracy_row, class_prompt_gap
from gnsp_core.metrics import mtil_metrics
from gnsp_core.models.spec import LoadedModel
from gnsp_core.report import plot_heatmap, write_markdown
from gnsp_core.schedules import Schedule
from gnsp_core.state import ContinualState
from gnsp_core.models.loading import resolve_device
from gnsp_core.task_context import Progress
from gnsp_core.trainer import learn_task

BenchProgress = Callable[[str, Progress], None]


def _step_timer() -> tuple[list[float], Callable[[Progress], None]]:
    times: list[float] = []

    def on_progress(p: Progress) -> None:
        if p.phase == "train":
            times.append(time.perf_counter())

    return times, on_progress


def pretrained_row(loaded: LoadedModel, tasks: list[Task], evals: list[Task], device: str = "auto") -> dict[str, Any]:
    """The pre-trained model's accuracy row and modality gap: the same for every method, measured once."""
    device = resolve_device(device)
    row = accuracy_row(loaded, tasks + evals, {}, device)
    return {"acc": row, "gap": class_prompt_gap(loaded, evals[0], device) if evals else None}


def run_method(
    loaded: LoadedModel, tasks: list[Task], evals: list[Task], config: TrainConfig,
    reference=None, progress: BenchProgress | None = None, pretrained: dict[str, Any] | None = None,
    schedule: Schedule | None = None,
) -> dict[str, Any]:
    """One method over the sequence: the (T+1) x (T+E) accuracy matrix, metrics, gap and cost.

    `pretrained` is `pretrained_row(...)` of these weights (measured here when not given); with a
    `schedule` each task trains with its own learning rate and steps."""
    device = resolve_device(config.device)
    state = ContinualState.initial(loaded.model, loaded.spec)
    everything = tasks + evals
    pretrained = pretrained or pretrained_row(loaded, tasks, evals, config.device)
    acc = [list(pretrained["acc"])]
    pretrained_gap = pretrained["gap"]
    gaps = [pretrained_gap["norm"]] if evals else []
    gap_cos: list[float | None] = [1.0] if evals else []
    train_s, step_ms = 0.0, []
    for task in tasks:
        times, on_step = _step_timer()

        def report(p: Progress) -> None:
            on_step(p)
            if progress is not None:
                progress(config.method, p)

        start = time.perf_counter()
        task_config = schedule.config_for(config, task.name) if schedule is not None else config
        state = learn_task(state, loaded, task, task_config, reference=reference, progress=report)
        train_s += time.perf_counter() - start
        if len(times) > 1:
            step_ms.append(1000 * (times[-1] - times[0]) / (len(times) - 1))
        loaded.model.load_state_dict(state.weights)
        acc.append(accuracy_row(loaded, everything, state.extras, device))
        if evals:
            gap = class_prompt_gap(loaded, evals[0], device, pretrained_gap["gap"])
            gaps.append(gap["norm"])
            gap_cos.append(gap["cosine"])
    metrics = mtil_metrics(acc, len(tasks))
    return {"acc": acc, **{k: metrics[k] for k in ("transfer", "avg", "last", "bwt", "fwt")},
            "plasticity": plasticity(acc),
            "modality_gap": gaps, "modality_gap_cosine": gap_cos, "train_s": train_s,
            "step_ms": sum(step_ms) / len(step_ms) if step_ms else 0.0, "config": config.to_dict()}


def plasticity(acc: list[list[float]]) -> float | None:
    """Mean of the accuracy matrix's diagonal: each task's accuracy right after learning it."""
    diagonal = [acc[i][i - 1] for i in range(1, len(acc))]
    return sum(diagonal) / len(diagonal) if diagonal else None


def run_bench(
    loaded: LoadedModel, tasks: list[Task], evals: list[Task], configs: dict[str, TrainConfig],
    out_dir: str | Path, *, reference=None, progress: BenchProgress | None = None, schedule: Schedule | None = None,
    seeds: int = 1,
) -> dict[str, Any]:
    """Run each named config from the same starting weights, `seeds` times (seeds config.seed,
    config.seed + 1, ...: the data, augmentation and reference order); write results.json,
    results.md and heatmaps. Each method's entry is the aggregate over its seeds (means at the top,
    95 % t-intervals in `ci` and `acc_ci`) with every seed's own run in `runs`. A `schedule` sets
    each task's learning rate and steps (every task must have a row)."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if schedule is not None:
        schedule.check(t.name for t in tasks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    initial = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    task_names, eval_names = [t.name for t in tasks], [e.name for e in evals]
    results: dict[str, Any] = {"model": loaded.spec.name, "tasks": task_names, "eval": eval_names, "methods": {},
                               "seeds": seeds, "schedule": schedule.to_dict() if schedule is not None else None}
    pretrained = pretrained_row(loaded, tasks, evals, next(iter(configs.values())).device) if configs else None
    for name, config in configs.items():
        runs: list[dict[str, Any]] = []
        for offset in range(seeds):
            loaded.model.load_state_dict(initial)
            seeded = config.replace(seed=config.seed + offset)
            label = name if seeds == 1 else f"{name} seed {seeded.seed}"
            report = None if progress is None else (lambda _, p, label=label: progress(label, p))
            runs.append(run_method(loaded, tasks, evals, seeded, reference, report, pretrained, schedule))
            results["methods"][name] = {**aggregate_runs(runs, task_names, eval_names), "runs": runs}
            _write(results, out)  # partial results survive an interrupted bench
    loaded.model.load_state_dict(initial)
    for name in configs:
        plot_heatmap(results, name, out / f"heatmap_{name}.png")
    return results


def _write(results: dict[str, Any], out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out / "results.json")
    write_markdown(results, out / "results.md")


