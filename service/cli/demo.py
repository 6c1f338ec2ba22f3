"""`gnsp demo`: the main job on the embedded offline default, start to finish, in a few minutes.

Fine-tuning and GNSP learn the same built-in tasks side by side, each from the pre-trained weights,
and one table shows what each kept and lost: every task right after it was learned and after the
last one, held-out zero-shot accuracy (data no task or alignment saw), retrieval and the modality
gap. Through the REST service on a private local Ray by default (`demo_rest.py`: every task a
Ray Train job whose processes start anew, about seven minutes on two cores), or the library in this
process with `--local` (`demo_local.py`: about two minutes); both print the same story
(`demo_table.py`).
"""

from __future__ import annotations

import argparse

from gnsp_core.data.builtin import DEFAULT_SEQUENCE
from gnsp_core.methods.registry import METHODS

from service.cli.arguments import add_model_arguments
from service.cli.demo_service import DemoError

DEMO_TASKS = ",".join(DEFAULT_SEQUENCE)
DEMO_METHODS = "finetune,gnsp"


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="learn built-in tasks with fine-tuning and GNSP side by side and print what "
                                    "each kept and lost")
    p.add_argument("--tasks", default=DEMO_TASKS, help="comma-separated task sources")
    p.add_argument("--methods", default=DEMO_METHODS,
                   help=f"comma-separated methods compared side by side, from {', '.join(METHODS)} "
                        f"(default {DEMO_METHODS})")
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


def demo_methods(value: str) -> list[str]:
    """The compared methods, checked before anything starts."""
    methods = list(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise DemoError(f"--methods {value!r}: {'unknown ' + ', '.join(unknown) if unknown else 'names no method'}; "
                        f"choose from {', '.join(METHODS)}")
    return methods


def run_demo(args: argparse.Namespace) -> int:
    """Through the REST service (default), or the library directly with --local."""
    methods = demo_methods(args.methods)
    if args.local:
        from service.cli.demo_local import run_local_demo

        return run_local_demo(args, methods)
    from service.cli.demo_rest import run_rest_demo

    return run_rest_demo(args, methods)
