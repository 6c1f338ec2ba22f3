"""Command-line pieces several subcommands share: the model options and reading a config file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gnsp_core.data.mtil import MTIL_ORDER_I, MTIL_ORDER_II, mtil_sources
from gnsp_core.errors import ConfigError

MTIL_ORDERS = {"order-I": MTIL_ORDER_I, "order-II": MTIL_ORDER_II}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """open_clip's own convention, shared by every command that builds a model."""
    parser.add_argument("--model", default=None,
                        help="open_clip architecture (e.g. ViT-B-16), 'tiny' for the small test config; "
                             "left out: the embedded offline default gnsp-mini")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag (e.g. openai; needs a network) or a local .safetensors/.pt file")


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
