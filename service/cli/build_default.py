"""`gnsp build-default`: build and cache the embedded offline default model, with a progress bar."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from gnsp_core.models import DEFAULT_MODEL


def add_build_default_parser(sub) -> None:
    p = sub.add_parser("build-default", help=f"build and cache the embedded offline default model ({DEFAULT_MODEL})")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")


def build_default_with_bar(force: bool = False) -> Path:
    """Build (or find) the cached default model, with a progress bar while it builds."""
    from gnsp_core.models.default import build_default_model, default_model_dir, is_built

    if is_built() and not force:
        return default_model_dir()
    bar = tqdm(total=100, unit="%", desc=f"building {DEFAULT_MODEL} (once)")

    def progress(fraction: float, message: str) -> None:
        bar.n = round(100 * fraction)
        bar.set_postfix_str(message)
        bar.refresh()

    path = build_default_model(progress=progress, force=force)
    bar.close()
    return path


def run_build_default(args: argparse.Namespace) -> int:
    path = build_default_with_bar(force=args.force)
    print(f"{DEFAULT_MODEL} is ready in {path}")
    return 0
