"""`gnsp demo`: the main job on the embedded offline default, start to finish, in a few minutes.

Learns built-in tasks one after another and prints what changed: accuracy on each new task,
held-out zero-shot accuracy (natural photos no task or alignment saw) and the modality gap.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from gnsp_core.config import TrainConfig
from gnsp_core.data import load_task
from gnsp_core.evaluation import class_prompt_gap, task_accuracy
from gnsp_core.models import DEFAULT_MODEL, ModelSpec, load_model
from gnsp_core.reference_data import load_heldout_task
from gnsp_core.state import ContinualState
from gnsp_core.trainer import Progress, learn_task, resolve_device

DEMO_TASKS = "digits,animals"
LOCAL_STEPS = 60


def add_demo_parser(sub) -> None:
    from service.cli import add_model_arguments

    p = sub.add_parser("demo", help="learn built-in tasks on the offline default and print a before/after table")
    p.add_argument("--tasks", default=DEMO_TASKS, help="comma-separated task sources")
    p.add_argument("--method", default="gnsp", help="continual-learning method (finetune, lwf, zscl, wise-ft, mgclip, gnsp)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps per task (default: 30 through the service, 60 with --local)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="learning rate (1e-3 suits gnsp-mini's small trainable heads; the paper's 1e-5 is for ViT-B/16)")
    p.add_argument("--reference", default="builtin",
                   help="reference image-caption pairs: builtin (emoji and flags) or module:function")
    p.add_argument("--store", default=None, help="store folder for the service (default: a temporary one)")
    p.add_argument("--max-train-per-class", type=int, default=40)
    p.add_argument("--max-test-per-class", type=int, default=20)
    p.add_argument("--local", action="store_true", help="run the library directly instead of through the service")
    add_model_arguments(p)


def _snapshot(loaded, tasks, heldout, state, device, pretrained_gap=None) -> dict:
    accs = {t.name: task_accuracy(loaded, t, state.extras, device=device) for t in tasks}
    gap = class_prompt_gap(loaded, heldout, device, pretrained_gap)
    return {"tasks": accs, "heldout": task_accuracy(loaded, heldout, device=device), "gap": gap}


def print_table(before: dict, after: dict, chance: dict[str, float]) -> None:
    rows = [("task", "chance", "before", "after")]
    for name in before["tasks"]:
        rows.append((f"{name} (learned)", f"{chance[name]:.1f}", f"{before['tasks'][name]:.1f}", f"{after['tasks'][name]:.1f}"))
    rows.append(("held-out photos (zero-shot)", f"{chance['heldout']:.1f}", f"{before['heldout']:.1f}", f"{after['heldout']:.1f}"))
    rows.append(("modality gap ‖Δ‖", "", f"{before['gap']['norm']:.3f}", f"{after['gap']['norm']:.3f}"))
    cos = after["gap"].get("cosine")
    rows.append(("gap direction cos(Δ, Δ₀)", "", "1.000", "n/a" if cos is None else f"{cos:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def run_demo(args: argparse.Namespace) -> int:
    """Through the REST service (default), or the library directly with --local."""
    if not args.local:
        from service.demo_rest import run_rest_demo

        return run_rest_demo(args)
    return run_local_demo(args)


def run_local_demo(args: argparse.Namespace) -> int:
    """The library path: learn the tasks in this process and print the table."""
    from service.sources import load_reference

    start = time.perf_counter()
    device = resolve_device("auto")
    if args.model is None:
        from .bench_cli import build_default_with_bar

        build_default_with_bar()
    print(f"loading {args.model or DEFAULT_MODEL} ...")
    loaded = load_model(ModelSpec(name=args.model or DEFAULT_MODEL, pretrained=args.pretrained), device)
    caps = dict(max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class)
    tasks = [load_task(s.strip(), **caps) for s in args.tasks.split(",") if s.strip()]
    heldout = load_heldout_task()
    reference = load_reference(args.reference)
    state = ContinualState.initial(loaded.model, loaded.spec)
    before = _snapshot(loaded, tasks, heldout, state, device)
    config = TrainConfig(method=args.method, lr=args.lr, steps=args.steps or LOCAL_STEPS)
    for task in tasks:
        bar = tqdm(total=config.steps, desc=f"learning {task.name}", unit="step", dynamic_ncols=True)

        def on_progress(p: Progress, bar=bar) -> None:
            bar.n = p.step
            bar.set_postfix(loss=f"{p.loss:.3f}", img_s=f"{p.samples_per_s:.0f}")
            bar.refresh()

        state = learn_task(state, loaded, task, config, reference=reference, progress=on_progress)
        bar.close()
    loaded.model.load_state_dict(state.weights)
    after = _snapshot(loaded, tasks, heldout, state, device, before["gap"]["gap"])
    chance = {t.name: 100 / len(t.classnames) for t in tasks} | {"heldout": 100 / len(heldout.classnames)}
    print(f"\n{args.method} on {loaded.spec.name}: accuracy (%) before and after learning {', '.join(t.name for t in tasks)}")
    print_table(before, after, chance)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0
