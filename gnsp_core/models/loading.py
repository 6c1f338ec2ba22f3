"""Model specs -> open_clip model, preprocess and tokenizer: the one way every process builds a model.

A spec names an open_clip architecture (`ViT-B-16`, the shipped `tiny`, or the embedded offline
default `gnsp-mini`) and where its weights come from: an open_clip pretrained tag (needs a
network), a local .safetensors/.pt file, or nothing (random init, seeded so it is reproducible).
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from gnsp_core.errors import ModelSpecError
from gnsp_core.models.allocator import keep_freed_memory
from gnsp_core.models.default import load_default_model
from gnsp_core.models.spec import DEFAULT_MODEL, LoadedModel, ModelSpec, register_configs


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


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one; anything else is a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
