"""`gnsp demo --local`: the library path, each method learning the tasks in this process."""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from gnsp_core.config import TrainConfig
from gnsp_core.data import Task, load_task
from gnsp_core.data.heldout import PAIRS_NAME, HeldoutSuite, load_heldout_suite
from gnsp_core.evaluation import task_accuracy
from gnsp_core.models import DEFAULT_MODEL, ModelSpec, load_model, recommended_training
from gnsp_core.models.loading import resolve_device
from gnsp_core.models.spec import LoadedModel
from gnsp_core.state import ContinualState
from gnsp_core.task_context import Progress
from gnsp_core.trainer import learn_task

from service.cli.arguments import task_sources
from service.cli.build_default import build_default_with_bar
from service.cli.demo_measure import local_measures, suite_items
from service.cli.demo_table import MethodRun, chance_levels, print_story
from service.training.sources import load_reference


def _learn(loaded: LoadedModel, tasks: list[Task], config: TrainConfig, reference, suite: HeldoutSuite,
           device, reference_gap) -> MethodRun:
    """One method over the tasks from the weights `loaded` holds now."""
    state = ContinualState.initial(loaded.model, loaded.spec)
    learned: dict[str, float] = {}
    for task in tasks:
        bar = tqdm(total=config.steps, desc=f"learning {config.method} · {task.name}", unit="step", dynamic_ncols=True)

        def on_progress(p: Progress, bar=bar) -> None:
            bar.n = p.step
            bar.set_postfix(loss=f"{p.loss:.3f}" if p.loss is not None else "-", img_s=f"{p.samples_per_s:.0f}")
            bar.refresh()

        state = learn_task(state, loaded, task, config, reference=reference, progress=on_progress)
        bar.close()
        loaded.model.load_state_dict(state.weights)
        learned[task.name] = task_accuracy(loaded, task, state.extras, device=device)
        print(f"  {config.method} learned {task.name}: {learned[task.name]:.1f} % on its test split", flush=True)
    return MethodRun(learned, local_measures(loaded, tasks, suite, state.extras, device, reference_gap))


def run_local_demo(args: argparse.Namespace, methods: list[str]) -> int:
    """The library path: learn the tasks once per method in this process and print the story."""
    start = time.perf_counter()
    device = resolve_device("auto")
    if args.model is None:
        build_default_with_bar()
    print(f"loading {args.model or DEFAULT_MODEL} ...", flush=True)
    loaded = load_model(ModelSpec(name=args.model or DEFAULT_MODEL, pretrained=args.pretrained), device)
    caps = dict(max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class)
    tasks = [load_task(s, **caps) for s in task_sources(args.tasks)]
    suite = load_heldout_suite()
    reference = load_reference(args.reference)
    pretrained = local_measures(loaded, tasks, suite, None, device)
    initial = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None}
    runs = {}
    for method in methods:
        loaded.model.load_state_dict(initial)  # every method starts from the pre-trained weights
        config = TrainConfig.from_dict({**recommended_training(loaded.spec.name), **overrides, "method": method})
        runs[method] = _learn(loaded, tasks, config, reference, suite, device, pretrained.gap_vector)
    print_story(loaded.spec.name, [t.name for t in tasks], chance_levels(tasks, suite), pretrained, runs,
                suite_items(suite), suite.sizes[PAIRS_NAME])
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0
