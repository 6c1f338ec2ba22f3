"""The `gnsp` command. Each subcommand lives in its own module; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import sys

from gnsp_core.errors import GnspError

# (module, adds the parser, runs the command); imported lazily so `gnsp --help` stays fast.
SUBCOMMANDS = {
    "demo": ("service.cli.demo", "add_demo_parser", "run_demo"),
    "serve": ("service.cli.serve", "add_serve_parser", "run_serve"),
    "learn": ("service.cli.learn", "add_learn_parser", "run_learn"),
    "bench": ("service.cli.bench", "add_bench_parser", "run_bench_command"),
    "tune": ("service.cli.tune", "add_tune_parser", "run_tune"),
    "build-default": ("service.cli.build_default", "add_build_default_parser", "run_build_default"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gnsp", description="Continual learning for CLIP models (GNSP).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, add, _run) in SUBCOMMANDS.items():
        try:
            getattr(importlib.import_module(module), add)(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module, _add, run = SUBCOMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(module), run)(args) or 0)
    except GnspError as exc:
        print(f"gnsp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gnsp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
