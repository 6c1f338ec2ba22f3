"""Command-line pieces several subcommands share: the model options and reading a config file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gnsp_core.config import PRESETS, merge_settings, preset_settings
from gnsp_core.data.mtil import MTIL_ORDER_I, MTIL_ORDER_II, mtil_sources
from gnsp_core.errors import ConfigError
from gnsp_core.models import recommended_training
from gnsp_core.schedules import SCHEDULES, Schedule, load_schedule

MTIL_ORDERS = {"order-I": MTIL_ORDER_I, "order-II": MTIL_ORDER_II}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """open_clip's own convention, shared by every command that builds a model."""
    parser.add_argument("--model", default=None,
                        help="open_clip architecture (e.g. ViT-B-16), 'tiny' for the small test config; "
                             "left out: the embedded offline default gnsp-mini")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag (e.g. openai; needs a network) or a local .safetensors/.pt file")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """`--preset` (a published recipe's settings) and `--schedule` (per-task learning rate and steps)."""
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="start from a published recipe: gnsp = the official GNSP settings (batch 64, 100 warm-up "
                             "steps then cosine, fp32, seed 42, ...), gnsp-exact = update projection on every map; "
                             "a --config file and the flags override it")
    parser.add_argument("--schedule", help=f"per-task learning rate and steps: {' or '.join(sorted(SCHEDULES))} "
                                           "(the official GNSP values), or a JSON file "
                                           '{"<task>": {"lr": 1e-5, "steps": 100}, ...}; every task needs a row')


def base_settings(model: str | None, preset_name: str | None, config_path: str | Path | None) -> dict[str, Any]:
    """The settings a command starts from: the model's recommended ones, then the preset's, then the file's."""
    return merge_settings(recommended_training(model), preset_settings(preset_name) if preset_name else {},
                          load_config_file(config_path) if config_path else {})


def schedule_option(spec: str | None, *fixed: tuple[str, object]) -> Schedule | None:
    """The `--schedule` a command was given, refusing flags it would silently override (e.g. --steps)."""
    if spec is None:
        return None
    clash = [name for name, value in fixed if value is not None]
    if clash:
        raise ConfigError(f"--schedule sets the learning rate and steps of every task; drop {', '.join(clash)}")
    return load_schedule(spec)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The TrainConfig fields in a JSON file: a plain object, or a tune result with them under `config`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object of training settings")
    return dict(data["config"]) if isinstance(data.get("config"), dict) else data


def task_sources(value: str) -> list[str]:
    """A `--tasks` list: comma-separated task sources, where `mtil:order-I@ROOT` (or `order-II`)
    stands for the whole MTIL sequence of that order, each dataset read from ROOT."""
    sources: list[str] = []
    for item in (s.strip() for s in value.split(",")):
        name, _, root = item.removeprefix("mtil:").partition("@")
        if item.startswith("mtil:") and name in MTIL_ORDERS:
            sources += mtil_sources(MTIL_ORDERS[name], root or None)
        elif item:
            sources.append(item)
    return sources
