"""`gnsp learn`: learn a sequence of tasks on Ray Train workers, with a live progress bar.

    gnsp learn --tasks digits,animals --method gnsp --workers 2 --out runs/seq1
    gnsp learn --tasks ./my_photos.zip --workers 4 --gpus-per-worker 1 --model ViT-B-16 --pretrained openai --out runs/seq2

The published GNSP recipe on MTIL order I (per-task lr and steps, 1,000 ImageNet reference images):

    gnsp learn --tasks mtil:order-I@/data --preset gnsp --schedule mtil-order-I --model ViT-B-16
        --pretrained openai --reference imagenet:/data/imagenet/train --gpus-per-worker 1 --out runs/mtil

Re-running the same command after an interruption (Ctrl-C, a crash) continues the sequence: finished
tasks are skipped and the running one resumes from its last checkpoint (see service.training.sequence).
"""

from __future__ import annotations

import argparse

from gnsp_core.config import TrainConfig
from gnsp_core.methods.registry import uses_reference
from gnsp_core.models import DEFAULT_MODEL, ModelSpec

from service.cli.arguments import (add_model_arguments, add_recipe_arguments, base_settings, schedule_option,
                                   task_sources)
from service.training.cluster import quiet_ray_warnings
from service.training.progress import JobProgress
from service.training.sources import BUILTIN

# Methods whose losses read reference image-caption pairs (CD/MAP, distillation).


def add_learn_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `learn` on the `gnsp` command's subparsers."""
    p = subparsers.add_parser("learn", help="learn a sequence of tasks with Ray Train workers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", required=True, help="comma-separated task sources: built-in names, folders, archives, "
                                                  "mtil:<dataset>@ROOT or mtil:order-I@ROOT (all 11 MTIL datasets)")
    p.add_argument("--out", required=True, help="output folder: a state per task + progress.json")
    p.add_argument("--method", help="finetune | lwf | zscl | wise-ft | mgclip | gnsp (default: the config's, else gnsp)")
    p.add_argument("--config", help="TrainConfig JSON (e.g. the best config from `gnsp tune`)")
    p.add_argument("--steps", type=int, help="optimiser steps per task (overrides the config)")
    add_recipe_arguments(p)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker; 0 trains on CPU (gloo)")
    add_model_arguments(p)
    p.add_argument("--reference", help="reference pairs: builtin, builtin:<kind>, imagenet:<folder>[#N], "
                                        "module:function, or none (default: builtin for the methods that distil on reference data: "
                                        "gnsp, zscl)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--max-failures", type=int, default=1, help="worker-group restarts allowed per task")
    p.add_argument("--storage", help="Ray Train run storage (folder or cloud URI; default OUT/runs)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.set_defaults(func=run_learn)
    return p


def build_config(path: str | None, method: str | None, steps: int | None, model: str | None = None,
                 preset: str | None = None) -> TrainConfig:
    """The model's recommended settings, then the preset's, then the config file (a TrainConfig dict,
    or {"config": {...}}), then the command-line overrides."""
    config = TrainConfig.from_dict(base_settings(model, preset, path))
    changes = {k: v for k, v in (("method", method), ("steps", steps)) if v is not None}
    return config.replace(**changes) if changes else config


def reference_for(spec: str | None, method: str) -> str | None:
    if spec is None:
        return BUILTIN if uses_reference(method) else None
    return None if spec.lower() == "none" else spec


def run_learn(args: argparse.Namespace) -> int:
    """Entry point of `gnsp learn`; returns the process exit code (user errors raise GnspError)."""
    quiet_ray_warnings()
    from service.training.sequence import learn_sequence  # imports Ray: keep `gnsp --help` fast

    tasks = task_sources(args.tasks)
    schedule = schedule_option(args.schedule, ("--steps", args.steps))
    config = build_config(args.config, args.method, args.steps, args.model, args.preset)
    bar = ProgressBar()
    try:
        result = learn_sequence(
            tasks, args.out, ModelSpec(name=args.model or DEFAULT_MODEL, pretrained=args.pretrained), config,
            workers=args.workers, gpus_per_worker=args.gpus_per_worker, address=args.address, progress=bar,
            reference=reference_for(args.reference, config.method), checkpoint_every=args.checkpoint_every,
            max_failures=args.max_failures, storage_path=args.storage, schedule=schedule,
        )
    finally:
        bar.close()
    skipped = len(tasks) - len(result.trained)
    if skipped:
        print(f"{skipped} task(s) were already learned in {args.out}; skipped")
    for path in result.state_dirs:
        print(f"state: {path}")
    return 0


class ProgressBar:
    """A tqdm bar per task, fed by ProgressBoard snapshots: step, loss, samples/s, ETA."""

    def __init__(self) -> None:
        self._bar = None
        self._task = -1

    def __call__(self, p: JobProgress) -> None:
        from tqdm import tqdm

        if p.total == 0:
            return
        if self._bar is None or p.task_index != self._task:
            self.close()
            self._bar, self._task = tqdm(total=p.total, unit="step", dynamic_ncols=True), p.task_index
        resumed = f" (resumed at {p.resumed_from})" if p.resumed_from else ""
        self._bar.set_description(f"[{p.task_index + 1}/{p.num_tasks}] {p.task} {p.phase}{resumed}")
        eta = f"{p.eta_s:.0f}s" if p.eta_s is not None else "?"
        loss = f"{p.loss:.3f}" if p.loss is not None else "-"
        self._bar.set_postfix_str(f"loss={loss} {p.samples_per_s:.1f} samples/s eta={eta}", refresh=False)
        self._bar.update(p.step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
