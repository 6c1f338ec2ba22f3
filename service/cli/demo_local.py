"""`gnsp demo --local`: the library path, learning the tasks in this process."""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from gnsp_core.config import TrainConfig
from gnsp_core.data import load_task
from gnsp_core.data.reference import load_heldout_task
from gnsp_core.evaluation import class_prompt_gap, task_accuracy
from gnsp_core.models import DEFAULT_MODEL, ModelSpec, load_model, recommended_training
from gnsp_core.models.loading import resolve_device
from gnsp_core.state import ContinualState
from gnsp_core.task_context import Progress
from gnsp_core.trainer import learn_task

from service.cli.arguments import task_sources
from service.cli.build_default import build_default_with_bar
from service.cli.demo_table import chance_levels, print_table
from service.training.sources import load_reference

def _snapshot(loaded, tasks, heldout, state, device, pretrained_gap=None) -> dict:
    accs = {t.name: task_accuracy(loaded, t, state.extras, device=device) for t in tasks}
    gap = class_prompt_gap(loaded, heldout, device, pretrained_gap)
    return {"tasks": accs, "heldout": task_accuracy(loaded, heldout, device=device), "gap": gap}


def run_local_demo(args: argparse.Namespace) -> int:
    """The library path: learn the tasks in this process and print the table."""
    start = time.perf_counter()
    device = resolve_device("auto")
    if args.model is None:
        build_default_with_bar()
    print(f"loading {args.model or DEFAULT_MODEL} ...")
    loaded = load_model(ModelSpec(name=args.model or DEFAULT_MODEL, pretrained=args.pretrained), device)
    caps = dict(max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class)
    tasks = [load_task(s, **caps) for s in task_sources(args.tasks)]
    heldout = load_heldout_task()
    reference = load_reference(args.reference)
    state = ContinualState.initial(loaded.model, loaded.spec)
    before = _snapshot(loaded, tasks, heldout, state, device)
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None}
    config = TrainConfig.from_dict({**recommended_training(loaded.spec.name), **overrides, "method": args.method})
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
    chance = chance_levels(tasks, heldout)
    print(f"\n{args.method} on {loaded.spec.name}: accuracy (%) before and after learning {', '.join(t.name for t in tasks)}")
    print_table(before, after, chance)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0
