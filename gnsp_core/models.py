"""Model specs -> open_clip model, preprocess and tokenizer.

A spec names an open_clip architecture (`ViT-B-16`, the shipped `tiny`, or the embedded offline
default `gnsp-mini`) and where its weights come from: an open_clip pretrained tag (needs a
network), a local .safetensors/.pt file, or nothing (random init, seeded so it is reproducible).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from .allocator import keep_freed_memory
from .errors import ModelSpecError

CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "gnsp-mini"
_configs_registered = False
# Models whose pre-trained towers stay frozen by default (TrainConfig.trainable="auto").
FROZEN_TOWERS = {DEFAULT_MODEL: r"^(visual\.head\.|text\.proj)"}


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


def register_configs() -> None:
    """Make the configs shipped in gnsp_core/model_configs known to open_clip by file stem."""
    global _configs_registered
    if not _configs_registered:
        open_clip.add_model_config(CONFIG_DIR)
        _configs_registered = True


def available_models() -> list[str]:
    register_configs()
    return [DEFAULT_MODEL] + open_clip.list_models()


def _resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    if pretrained is None:
        return None
    if pretrained.endswith((".safetensors", ".pt", ".pth", ".bin")) or "/" in pretrained:
        if not Path(pretrained).is_file():
            raise ModelSpecError(
                f"checkpoint file {pretrained!r} does not exist; pass an existing .safetensors/.pt "
                "file or an open_clip pretrained tag such as 'openai'"
            )
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        known = ", ".join(tags) or "none"
        raise ModelSpecError(f"unknown pretrained tag {pretrained!r} for {name}; known tags: {known}")
    return pretrained


def load_model(spec: ModelSpec | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model a spec describes, in float32 on `device`. The caller's RNG is left where it
    was (building a model draws random initial weights), so loading one mid-run changes nothing."""
    with torch.random.fork_rng(devices=[]):
        return _load_model(spec or ModelSpec(), device)


def _load_model(spec: ModelSpec, device: str | torch.device) -> LoadedModel:
    keep_freed_memory()  # every process that runs a model gets here first
    register_configs()
    if spec.name == DEFAULT_MODEL:
        from .default_model import load_default_model

        return load_default_model(spec, device)
    if spec.name not in open_clip.list_models():
        raise ModelSpecError(
            f"unknown model {spec.name!r}; use an open_clip architecture (e.g. ViT-B-16), "
            f"'tiny', or '{DEFAULT_MODEL}'"
        )
    pretrained = _resolve_pretrained(spec.name, spec.pretrained)
    torch.manual_seed(spec.seed)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            spec.name, pretrained=pretrained, device=device, precision="fp32"
        )
    except (RuntimeError, OSError) as exc:
        raise ModelSpecError(f"could not load {spec.name} with pretrained={spec.pretrained!r}: {exc}") from exc
    tokenizer = open_clip.get_tokenizer(spec.name)
    return LoadedModel(model, preprocess_train, preprocess_val, tokenizer, spec)


def trainable_pattern(setting: str, model_name: str) -> str:
    """The parameter-name regex a TrainConfig.trainable setting means for this model."""
    if setting == "auto":
        return FROZEN_TOWERS.get(model_name, ".*")
    return ".*" if setting == "all" else setting


def model_config(name: str) -> dict[str, Any]:
    register_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ModelSpecError(f"no config for model {name!r}")
    return json.loads(json.dumps(cfg))
