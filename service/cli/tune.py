"""`gnsp tune`: search GNSP's threshold and loss weights with Ray Tune over Ray Train.

    gnsp tune --tasks digits,animals --trials 12 --steps 30 --out runs/tune1
    gnsp tune --resume --out runs/tune1            # continue an interrupted search
    gnsp learn --tasks digits,animals --config runs/tune1/best.json --out runs/seq1

Trials are scored on validation splits carved out of each task's training data (see
service.tuning.objective for the objective and why); the test splits are never read.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from gnsp_core.errors import ConfigError
from gnsp_core.models import DEFAULT_MODEL, ModelSpec

from service.cli.arguments import add_model_arguments, task_sources
from service.cli.learn import build_config
from service.tuning.request import DEFAULT_THRESHOLD, SearchSpace, TuneRequest

DEFAULT_RANGES = {**dataclasses.asdict(SearchSpace()), "threshold": DEFAULT_THRESHOLD["energy"]}


def add_tune_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `tune` on the `gnsp` command's subparsers."""
    p = subparsers.add_parser("tune", help="search the null-space threshold and loss weights (Ray Tune)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", help="comma-separated task sources, learned in order by every trial")
    p.add_argument("--out", required=True, help="output folder: trials table, plot, best.json, Ray Tune run")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search in --out (other options are ignored)")
    p.add_argument("--trials", type=int, default=12, help="number of trials (default 12)")
    p.add_argument("--searcher", choices=("optuna", "random"), default="optuna", help="optuna = TPE (default)")
    p.add_argument("--from-state", help="tune the next task(s) of this continual state folder instead of a fresh sequence")
    p.add_argument("--config", help="base TrainConfig JSON: everything not searched")
    p.add_argument("--steps", type=int, help="optimiser steps per task (overrides the config)")
    p.add_argument("--batch-size", type=int, help="images per step (overrides the config)")
    p.add_argument("--max-train-per-class", type=int, help="cap each task's training split (before the validation split)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each TRAIN split held out for validation")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs fit)")
    p.add_argument("--range", action="append", default=[], metavar="NAME=LOW,HIGH",
                   help="search range of threshold, cd_weight, map_weight or lr (repeatable; defaults: "
                        f"{', '.join(f'{k}={lo:g},{hi:g}' for k, (lo, hi) in DEFAULT_RANGES.items())}; "
                        "threshold=%g,%g with the cut-off rule)" % DEFAULT_THRESHOLD["cutoff"])
    p.add_argument("--seed", type=int, default=0, help="searcher seed")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    add_model_arguments(p)
    return p


def parse_ranges(items: list[str]) -> SearchSpace:
    """`["lr=1e-5,1e-3", ...]` -> a SearchSpace with those ranges changed."""
    ranges = {}
    for item in items:
        name, _, bounds = item.partition("=")
        try:
            low, high = (float(b) for b in bounds.split(","))
        except ValueError:
            raise ConfigError(f"--range {item!r}: write NAME=LOW,HIGH, e.g. lr=1e-5,1e-3") from None
        ranges[name.strip()] = (low, high)
    unknown = sorted(set(ranges) - set(DEFAULT_RANGES))
    if unknown:
        raise ConfigError(f"--range: unknown names {unknown}; searched values are {sorted(DEFAULT_RANGES)}")
    return SearchSpace(**ranges)


def build_request(args: argparse.Namespace) -> TuneRequest:
    """The TuneRequest the flags describe (or, with --resume, the one saved in --out)."""
    if args.resume:
        return TuneRequest.load(args.out)
    if not args.tasks:
        raise ConfigError("--tasks is required (unless --resume)")
    config = build_config(args.config, "gnsp", args.steps, args.model)
    if args.batch_size is not None:
        config = config.replace(batch_size=args.batch_size)
    return TuneRequest(
        tasks=task_sources(args.tasks), out_dir=args.out,
        model=ModelSpec(name=args.model or DEFAULT_MODEL, pretrained=args.pretrained), base_state=args.from_state,
        trials=args.trials, config=config, space=parse_ranges(args.range), searcher=args.searcher, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker, max_concurrent=args.max_concurrent,
        max_train_per_class=args.max_train_per_class, val_fraction=args.val_fraction, seed=args.seed,
    )


def run_tune(args: argparse.Namespace) -> int:
    """Entry point of `gnsp tune`; returns the process exit code."""
    from service.tuning.run import run_tune_job  # imports Ray: keep `gnsp --help` fast

    request = build_request(args)
    progress = logging.getLogger("gnsp.tune")
    progress.setLevel(logging.INFO)
    progress.addHandler(logging.StreamHandler(sys.stdout))
    progress.propagate = False  # Ray or a library may have configured the root logger as well
    outcome = run_tune_job(request, resume=args.resume, address=args.address)
    print(outcome.folder.read_bytes("trials.md").decode())
    if outcome.best is None:
        print("no trial learned every task: no best config", file=sys.stderr)
        return 1
    b = outcome.best
    print(f"best: trial {b['trial_id']} ρ={b['threshold']:.3f} CD={b['cd_weight']:.2f} MAP={b['map_weight']:.2f} "
          f"lr={b['lr']:.1e} objective {b['objective']:.3f}\nwrote {outcome.folder}/best.json "
          f"(use with `gnsp learn --config` or `gnsp bench --config`), trials.csv, trials.md, objective_vs_threshold.png")
    return 0
