"""`gnsp bench`: several methods over one task sequence through the library, with a progress bar."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from gnsp_core.bench import run_bench
from gnsp_core.config import TrainConfig
from gnsp_core.data import Task, load_task
from gnsp_core.data.builtin import DEFAULT_SEQUENCE
from gnsp_core.data.heldout import HELDOUT, HeldoutSuite, load_heldout_suite
from gnsp_core.methods.registry import METHODS
from gnsp_core.models import DEFAULT_MODEL, ModelSpec, load_model
from gnsp_core.schedules import Schedule
from gnsp_core.report import heldout_table, summary_table
from gnsp_core.models.loading import resolve_device
from gnsp_core.task_context import Progress

from service.cli.arguments import (add_model_arguments, add_recipe_arguments, base_settings, schedule_option,
                                   task_sources)



def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every training command shares; `--config` takes a JSON file of TrainConfig fields."""
    parser.add_argument("--config", type=Path, help="JSON file of training settings (e.g. best.json from `gnsp tune`)")
    parser.add_argument("--steps", type=int, help="optimiser steps per task")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--batch-size", type=int, help="images per step")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--reference", default="builtin",
                        help="reference image-caption pairs for CD/MAP/ZSCL: builtin[:emoji|flags|emoji+flags], "
                             "imagenet:<folder>[#N] (N seeded images of an ImageNet-layout folder, default 1000) "
                             "or module:function")
    add_recipe_arguments(parser)


def training_config(args: argparse.Namespace, method: str) -> TrainConfig:
    """One method's config: the recommended, preset and file settings, then the flags; a preset's
    settings apply to every compared method (its own method is replaced)."""
    data = base_settings(args.model, getattr(args, "preset", None), getattr(args, "config", None))
    data["method"] = method
    for field, value in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size),
                         ("device", args.device), ("seed", args.seed)):
        if value is not None:
            data[field] = value
    return TrainConfig.from_dict(data)


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="compare methods over a task sequence; writes results.json, a table, heatmaps")
    p.add_argument("--tasks", default=",".join(DEFAULT_SEQUENCE),
                   help="comma-separated task sources (built-in names or class groups such as fashion:0-1, folders, "
                        "archives, mtil:<dataset>@ROOT, mtil:order-I@ROOT or mtil:order-II@ROOT); default: "
                        f"{','.join(DEFAULT_SEQUENCE)}")
    p.add_argument("--eval", default=HELDOUT,
                   help="comma-separated eval sets: task sources, or 'heldout' = the held-out suite (held-out "
                        "emoji, flags and photos, each over its own labels, and image-text retrieval)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=_positive, default=1,
                   help="runs per method with seeds seed, seed+1, ... (data, augmentation and reference order); "
                        "tables and heatmaps show the mean ± 95 %% CI (default 1)")
    p.add_argument("--max-train-per-class", type=int, default=None)
    p.add_argument("--max-test-per-class", type=int, default=None)
    add_model_arguments(p)
    add_training_arguments(p)


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of seeds >= 1 (e.g. --seeds 3)")
    return number


def load_evals(sources: list[str], **caps) -> tuple[list[Task], HeldoutSuite | None]:
    """The eval tasks named, and the held-out suite when `heldout` is among them."""
    tasks = [load_task(s, **caps) for s in sources if s != HELDOUT]
    return tasks, (load_heldout_suite() if HELDOUT in sources else None)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _steps(config: TrainConfig, tasks: list[Task], schedule: Schedule | None) -> int:
    return sum(schedule.row(t.name).steps for t in tasks) if schedule else config.steps * len(tasks)


def run_bench_command(args: argparse.Namespace) -> int:
    from service.training.sources import load_reference

    methods = _split(args.methods)
    schedule = schedule_option(args.schedule, ("--steps", args.steps), ("--lr", args.lr))
    configs = {m: training_config(args, m) for m in methods}
    caps = dict(max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class)
    tasks = [load_task(s, **caps) for s in task_sources(args.tasks)]
    if schedule is not None:
        schedule.check(t.name for t in tasks)
    evals, suite = load_evals(_split(args.eval), max_test_per_class=args.max_test_per_class)
    reference = load_reference(args.reference) if args.reference else None
    spec = ModelSpec(name=args.model or DEFAULT_MODEL, pretrained=args.pretrained)
    loaded = load_model(spec, resolve_device(args.device or "auto"))
    total = args.seeds * sum(_steps(configs[m], tasks, schedule) for m in methods)
    bar = tqdm(total=total, unit="step", desc="bench", dynamic_ncols=True)
    seen: dict[tuple[str, str], int] = {}

    def on_progress(method: str, p: Progress) -> None:
        done = seen.get((method, p.task), 0)
        bar.update(p.step - done)
        seen[(method, p.task)] = p.step
        bar.set_description(f"{method} · {p.task}")
        bar.set_postfix(loss=f"{p.loss:.3f}" if p.loss is not None else "-", img_s=f"{p.samples_per_s:.0f}")

    start = time.perf_counter()
    results = run_bench(loaded, tasks, evals, configs, args.out, reference=reference, progress=on_progress,
                        schedule=schedule, suite=suite, seeds=args.seeds)
    bar.close()
    print(summary_table(results))
    heldout = heldout_table(results)
    if heldout:
        print(f"\nheld-out after the last task (%)\n{heldout}")
    print(f"\nwrote {args.out}/results.json, results.md and heatmap_<method>.png in {time.perf_counter() - start:.0f} s")
    return 0
