"""`gnsp bench`: several methods over one task sequence, with held-out evaluation sets.

Every method starts from the same pre-trained weights; after each task the whole accuracy row is
measured (all tasks, then the eval sets, then the held-out suite's sets) and the modality gap on
the first eval set (else the suite's photos). With a held-out suite (`gnsp_core.data.heldout`),
each method also gets one entry per row (zero-shot first) of `heldout_acc` (pooled top-1),
`retrieval_r1`, `retrieval_r5` (mean of both directions) and `retrieval` (the four recalls);
`results["sizes"]` gives the test items of every task and eval set and the retrieval pairs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from gnsp_core.bench_stats import aggregate_runs
from gnsp_core.config import TrainConfig
from gnsp_core.data.heldout import HeldoutSuite
from gnsp_core.data.samples import Task
from gnsp_core.evaluation import accuracy_row, class_prompt_gap, heldout_metrics
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


HELDOUT_KEYS = ("heldout_acc", "retrieval_r1", "retrieval_r5", "retrieval")
"""Per-row held-out suite entries of every method in results.json (see `evaluation.suite_summary`)."""


def measure_row(loaded: LoadedModel, tasks: list[Task], evals: list[Task], suite: HeldoutSuite | None,
                extras: dict, device) -> tuple[list[float], dict[str, Any] | None]:
    """One accuracy row (tasks, eval sets, then the suite's sets) and the suite's metrics (None without one)."""
    row = accuracy_row(loaded, tasks + evals, extras, device)
    if suite is None:
        return row, None
    held = heldout_metrics(loaded, suite, device)
    return row + [held["heldout_sets"][name] for name in suite.set_names], held


def _gap_task(evals: list[Task], suite: HeldoutSuite | None) -> Task | None:
    if evals:
        return evals[0]
    return suite.photo_tasks[0] if suite is not None and suite.photo_tasks else None


def pretrained_row(loaded: LoadedModel, tasks: list[Task], evals: list[Task], device: str = "auto",
                   suite: HeldoutSuite | None = None) -> dict[str, Any]:
    """The pre-trained model's accuracy row, held-out metrics and modality gap: the same for every
    method, measured once."""
    device = resolve_device(device)
    row, held = measure_row(loaded, tasks, evals, suite, {}, device)
    gap_task = _gap_task(evals, suite)
    return {"acc": row, "heldout": held, "gap": class_prompt_gap(loaded, gap_task, device) if gap_task else None}


def run_method(
    loaded: LoadedModel, tasks: list[Task], evals: list[Task], config: TrainConfig,
    reference=None, progress: BenchProgress | None = None, pretrained: dict[str, Any] | None = None,
    schedule: Schedule | None = None, suite: HeldoutSuite | None = None,
) -> dict[str, Any]:
    """One method over the sequence: the (T+1) x (T+E) accuracy matrix, metrics, gap and cost.

    `pretrained` is `pretrained_row(...)` of these weights (measured here when not given); with a
    `schedule` each task trains with its own learning rate and steps."""
    device = resolve_device(config.device)
    state = ContinualState.initial(loaded.model, loaded.spec)
    pretrained = pretrained or pretrained_row(loaded, tasks, evals, config.device, suite)
    acc = [list(pretrained["acc"])]
    held = [pretrained["heldout"]] if suite is not None else []
    gap_task = _gap_task(evals, suite)
    pretrained_gap = pretrained["gap"]
    gaps = [pretrained_gap["norm"]] if gap_task else []
    gap_cos: list[float | None] = [1.0] if gap_task else []
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
        row, row_held = measure_row(loaded, tasks, evals, suite, state.extras, device)
        acc.append(row)
        held += [row_held] if row_held is not None else []
        if gap_task is not None:
            gap = class_prompt_gap(loaded, gap_task, device, pretrained_gap["gap"])
            gaps.append(gap["norm"])
            gap_cos.append(gap["cosine"])
    metrics = mtil_metrics(acc, len(tasks))
    return {"acc": acc, **{k: metrics[k] for k in ("transfer", "avg", "last", "bwt", "fwt")},
            "plasticity": plasticity(acc),
            **({k: [h[k] for h in held] for k in HELDOUT_KEYS} if held else {}),
            "modality_gap": gaps, "modality_gap_cosine": gap_cos, "train_s": train_s,
            "step_ms": sum(step_ms) / len(step_ms) if step_ms else 0.0, "config": config.to_dict()}


def plasticity(acc: list[list[float]]) -> float | None:
    """Mean of the accuracy matrix's diagonal: each task's accuracy right after learning it."""
    diagonal = [acc[i][i - 1] for i in range(1, len(acc))]
    return sum(diagonal) / len(diagonal) if diagonal else None


def run_bench(
    loaded: LoadedModel, tasks: list[Task], evals: list[Task], configs: dict[str, TrainConfig],
    out_dir: str | Path, *, reference=None, progress: BenchProgress | None = None, schedule: Schedule | None = None,
    suite: HeldoutSuite | None = None, seeds: int = 1,
) -> dict[str, Any]:
    """Run each named config from the same starting weights, `seeds` times (seeds config.seed,
    config.seed + 1, ...: the data, augmentation and reference order); write results.json,
    results.md and heatmaps. Each method's entry is the aggregate over its seeds (means at the top,
    95 % t-intervals in `ci` and `acc_ci`) with every seed's own run in `runs`. A `schedule` sets
    each task's learning rate and steps (every task must have a row); a held-out `suite` adds its
    sets as columns and its metrics to every method (module docstring)."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if schedule is not None:
        schedule.check(t.name for t in tasks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    initial = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    suite_names = suite.set_names if suite is not None else []
    task_names, eval_names = [t.name for t in tasks], [e.name for e in evals] + suite_names
    results: dict[str, Any] = {"model": loaded.spec.name, "tasks": task_names, "eval": eval_names, "methods": {},
                               "sizes": {t.name: len(t.test) for t in tasks + evals} | (suite.sizes if suite else {}),
                               "seeds": seeds, "schedule": schedule.to_dict() if schedule is not None else None}
    device = next(iter(configs.values())).device if configs else "auto"
    pretrained = pretrained_row(loaded, tasks, evals, device, suite) if configs else None
    for name, config in configs.items():
        runs: list[dict[str, Any]] = []
        for offset in range(seeds):
            loaded.model.load_state_dict(initial)
            seeded = config.replace(seed=config.seed + offset)
            label = name if seeds == 1 else f"{name} seed {seeded.seed}"
            report = None if progress is None else (lambda _, p, label=label: progress(label, p))
            runs.append(run_method(loaded, tasks, evals, seeded, reference, report, pretrained, schedule, suite))
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


