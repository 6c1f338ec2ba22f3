"""What a model is: a spec (architecture + weights), the loaded model with its transforms, and its configs.

A spec names an open_clip architecture (`ViT-B-16`, the shipped `tiny`, or the embedded offline
default `gnsp-mini`) and where its weights come from: an open_clip pretrained tag (needs a
network), a local .safetensors/.pt file, or nothing (random init, seeded so it is reproducible).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from gnsp_core.errors import ModelSpecError

CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "gnsp-mini"
_configs_registered = False
# Models whose pre-trained towers stay frozen by default (TrainConfig.trainable="auto").
FROZEN_TOWERS = {DEFAULT_MODEL: r"^(visual\.head\.|text\.proj)"}
RECOMMENDED_TRAINING: dict[str, dict[str, Any]] = {DEFAULT_MODEL: {"steps": 30, "lr": 1e-3, "batch_size": 32}}
"""Training settings that learn a small task well, where they differ from TrainConfig's defaults
(the paper's, for a full CLIP): gnsp-mini trains only its two small heads, so it needs a larger step
and far fewer of them (README, "gnsp-mini")."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same starting model anywhere."""

    name: str = DEFAULT_MODEL
    """open_clip architecture name, `tiny`, or `gnsp-mini` (the embedded offline default)."""
    pretrained: str | None = None
    """open_clip pretrained tag, a local .safetensors/.pt path, or None (random init, or the default's own weights)."""
    seed: int = 0
    """Seed for random initialisation, so a model without pretrained weights is reproducible."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        return cls(**{k: data[k] for k in ("name", "pretrained", "seed") if k in data})


@dataclass
class LoadedModel:
    """A model with the transforms and tokenizer that belong to it."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    spec: ModelSpec

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def recommended_training(model_name: str | None) -> dict[str, Any]:
    """The TrainConfig fields a model recommends; the caller's own settings override them."""
    return dict(RECOMMENDED_TRAINING.get(model_name or DEFAULT_MODEL, {}))


def register_configs() -> None:
    """Make the configs shipped in gnsp_core/models/model_configs known to open_clip by file stem."""
    global _configs_registered
    if not _configs_registered:
        open_clip.add_model_config(CONFIG_DIR)
        _configs_registered = True


def available_models() -> list[str]:
    register_configs()
    return [DEFAULT_MODEL] + open_clip.list_models()


def trainable_pattern(setting: str, model_name: str) -> str:
    """The parameter-name regex a TrainConfig.trainable setting means for this model."""
    if setting == "auto":
        return FROZEN_TOWERS.get(model_name, ".*")
    return ".*" if setting == "all" else setting


def mark_trainable(model: torch.nn.Module, setting: str, model_name: str) -> None:
    """Set `requires_grad` on every parameter of `model` by what `setting` (TrainConfig.trainable)
    means for this model: a task and the node's priming must agree on what stays frozen, since the
    frozen parts are what the feature cache memoises."""
    allowed = re.compile(trainable_pattern(setting, model_name))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(bool(allowed.match(name)))


def model_config(name: str) -> dict[str, Any]:
    register_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ModelSpecError(f"no config for model {name!r}")
    return json.loads(json.dumps(cfg))
