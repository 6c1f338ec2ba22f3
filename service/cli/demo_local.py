"""`gnsp demo --local`: the library path, learning the tasks in this process."""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from gnsp_core.config import TrainConfig
from gnsp_core.data import load_task
from gnsp_core.data.heldout import load_heldout_suite
from gnsp_core.evaluation import class_prompt_gap, heldout_metrics, task_accuracy
from gnsp_core.models import DEFAULT_MODEL, ModelSpec, load_model, recommended_training
from gnsp_core.models.loading import resolve_device
from gnsp_core.state import ContinualState
from gnsp_core.task_context import Progress
from gnsp_core.trainer import learn_task

from service.cli.arguments import task_sources
from service.cli.build_default import build_default_with_bar
from service.cli.demo_table import chance_levels, print_table
from service.training.sources import load_reference

def _snapshot(loaded, tasks, suite, state, device, pretrained_gap=None) -> dict:
    accs = {t.name: task_accuracy(loaded, t, state.extras, device=device) for t in tasks}
    gap = class_prompt_gap(loaded, suite.photo_tasks[0], device, pretrained_gap)
    held = heldout_metrics(loaded, suite, device)
    return {"tasks": accs, "heldout": held["heldout_acc"], "retrieval_r1": held["retrieval_r1"], "gap": gap}


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
    suite = load_heldout_suite()
    reference = load_reference(args.reference)
    state = ContinualState.initial(loaded.model, loaded.spec)
    before = _snapshot(loaded, tasks, suite, state, device)
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
    after = _snapshot(loaded, tasks, suite, state, device, before["gap"]["gap"])
    chance = chance_levels(tasks, suite)
    print(f"\n{args.method} on {loaded.spec.name}: accuracy (%) before and after learning {', '.join(t.name for t in tasks)}")
    print_table(before, after, chance, suite.sizes)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0
