"""`gnsp demo`: the main job on the embedded offline default, start to finish, in a few minutes.

Learns built-in tasks one after another and prints what changed: accuracy on each new task,
held-out zero-shot accuracy (natural photos no task or alignment saw) and the modality gap.
Through the REST service by default (`demo_rest.py`), or the library in this process with
`--local` (`demo_local.py`); both print the same table (`demo_table.py`).
"""

from __future__ import annotations

import argparse

from gnsp_core.data.builtin import DEFAULT_SEQUENCE

from service.cli.arguments import add_model_arguments

DEMO_TASKS = ",".join(DEFAULT_SEQUENCE)


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="learn built-in tasks on the offline default and print a before/after table")
    p.add_argument("--tasks", default=DEMO_TASKS, help="comma-separated task sources")
    p.add_argument("--method", default="gnsp", help="continual-learning method (finetune, lwf, zscl, wise-ft, mgclip, gnsp)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per task (default: the model's recommendation)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the model's recommendation: 1e-3 for gnsp-mini's small heads)")
    p.add_argument("--reference", default="builtin",
                   help="reference image-caption pairs: builtin (emoji and flags) or module:function")
    p.add_argument("--store", default=None, help="store folder for the service (default: a temporary one)")
    p.add_argument("--max-train-per-class", type=int, default=40)
    p.add_argument("--max-test-per-class", type=int, default=20)
    p.add_argument("--local", action="store_true", help="run the library directly instead of through the service")
    add_model_arguments(p)


def run_demo(args: argparse.Namespace) -> int:
    """Through the REST service (default), or the library directly with --local."""
    if args.local:
        from service.cli.demo_local import run_local_demo

        return run_local_demo(args)
    from service.cli.demo_rest import run_rest_demo

    return run_rest_demo(args)
