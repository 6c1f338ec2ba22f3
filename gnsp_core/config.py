"""Typed training configuration. Fields carry their own docs; the CLI and the service read them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gnsp_core.errors import ConfigError
from gnsp_core.projection import ProjectionConfig


def check_keys(cls: type, data: dict[str, Any], what: str) -> None:
    """Refuse keys that are not fields of the dataclass `cls`, so a typo never passes silently."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what} keys {unknown}; known keys: {sorted(known)}")


@dataclass
class TrainConfig:
    method: str = "gnsp"
    """finetune | lwf | zscl | wise-ft | mgclip | gnsp"""
    steps: int = 200
    """Optimiser steps per task."""
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 20
    """Linear warm-up, then cosine decay to zero."""
    label_smoothing: float = 0.2
    logit_scale: float = 100.0
    """Fixed, not trained (as in GNSP and MG-CLIP)."""
    template: str | None = None
    """Prompt for the task loss; None: the task's first template (`Task.templates`, "a photo of a
    {}." for a task that ships none). Evaluation uses the task's whole template ensemble."""
    ref_batch_size: int = 64
    """Reference image-caption pairs per step (CD, MAP, ZSCL)."""
    cd_weight: float = 1.0
    map_weight: float = 0.75
    cd_temperature: float = 2.0
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    trainable: str = "auto"
    """Regex of parameter names that may train; `all`; or `auto`: `all`, except on gnsp-mini whose
    pre-trained towers stay frozen (LiT-style, as it was aligned) and only its heads train."""
    first_task_full_finetune: bool = True
    """GNSP: task 1 trains both towers with no projection; later tasks train only projected maps."""
    stats_batch_size: int = 16
    stats_augment: bool = True
    """GNSP statistics pass with train augmentation (paper); False makes it deterministic."""
    lwf_weight: float = 1.0
    zscl_weight: float = 1.0
    ensemble_every: int = 10
    """ZSCL weight ensembling: average the weights every N steps."""
    wise_alpha: float = 0.5
    """WiSE-FT: W = (1 - α) W_pretrained + α W_finetuned after each task."""
    lora_rank: int = 8
    lora_alpha: float = 1.0
    gap_alpha: float = 0.10
    """MG-CLIP: stop when the mean negative logit moves by more than this fraction."""
    gap_check_every: int = 20
    compensation_epochs: int = 3
    compensation_weight: float = 4.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    cache_views: int = 2
    """Feature cache: seeded augmented views per training image for which the frozen part of a
    tower (gnsp-mini's trunks, a frozen text tower) runs once; epoch e trains on view e mod N.
    0 turns the cache off (every step runs every part, with fresh augmentation)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from JSON-like data; unknown keys are an error so typos do not pass silently."""
        check_keys(cls, data, "config")
        data = dict(data)
        proj = data.pop("projection", None)
        if isinstance(proj, dict):
            check_keys(ProjectionConfig, proj, "projection")
            proj = ProjectionConfig(**proj)
        cfg = cls(**data, **({"projection": proj} if proj is not None else {}))
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed; `projection_<field>` keys change the projection config."""
        proj_changes = {k[len("projection_"):]: v for k, v in changes.items() if k.startswith("projection_")}
        rest = {k: v for k, v in changes.items() if not k.startswith("projection_")}
        proj = dataclasses.replace(self.projection, **proj_changes)
        cfg = dataclasses.replace(self, projection=proj, **rest)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        checks = {
            "steps": self.steps >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "ref_batch_size": self.ref_batch_size >= 1, "wise_alpha": 0 <= self.wise_alpha <= 1,
            "cache_views": self.cache_views >= 0,
            "projection.threshold": self.projection.threshold > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid values for {bad}: steps/batch sizes must be >= 1, lr > 0, 0 <= wise_alpha <= 1")
        if self.projection.rule not in ("energy", "cutoff") or self.projection.target not in ("gradient", "update"):
            raise ConfigError("projection.rule must be 'energy' or 'cutoff'; projection.target 'gradient' or 'update'")
        if self.template is not None and (not isinstance(self.template, str) or self.template.count("{}") != 1):
            raise ConfigError(f"template {self.template!r} must contain '{{}}' once, where the class name goes; "
                              "leave it out to train on the task's own first template")


GNSP_RECIPE: dict[str, Any] = dict(
    method="gnsp", batch_size=64, warmup_steps=100, amp=False, lr=1e-5, steps=1000, weight_decay=0.0,
    label_smoothing=0.2, logit_scale=100.0, ref_batch_size=64, cd_weight=1.0, map_weight=0.75, cd_temperature=2.0,
    stats_batch_size=16, stats_augment=True, first_task_full_finetune=True, seed=42,
    projection_scope="vision_mlp", projection_target="gradient", projection_rule="energy", projection_threshold=0.15,
    projection_stat_norm="batch", projection_seed_with_reference=False,
)
"""The official GNSP recipe (Ppp-Ttt/GNSP, configs/mtil_order_*.json and its training code), setting for
setting: AdamW without weight decay at batch 64, 100 warm-up iterations then cosine, fp32 (no bf16
autocast), CE with label smoothing 0.2 + 1.0 CD (T = 2) + 0.75 MAP on 64 reference pairs per step,
logit scale 100, statistics after each task at batch 16 with train augmentation, energy rule ρ = 0.15
on the vision MLPs and `visual.proj` with the raw gradient projected, task 1 a full fine-tune, seed 42.
Learning rate and iterations are per task in the paper (`gnsp_core.schedules`); 1e-5 and 1,000 stand
in for a task no schedule names."""

EXACT_CUTOFF = 1e4
"""`gnsp-exact`'s cut-off a (eigenvalues <= a * lambda_min are the null space): the most plastic
update-projected setting that keeps BWT >= -1 on gnsp-mini's default sequence
(benchmarks/gnsp_ablation.py; a = 10 learns 0.4 points less per task there)."""

PRESETS: dict[str, dict[str, Any]] = {
    "gnsp": GNSP_RECIPE,
    "gnsp-exact": dict(method="gnsp", projection_scope="all", projection_target="update",
                       projection_rule="cutoff", projection_threshold=EXACT_CUTOFF),
}


def preset_settings(name: str) -> dict[str, Any]:
    """The fields a preset sets, in `TrainConfig.from_dict` form (projection fields nested)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    flat = PRESETS[name]
    nested = {k: v for k, v in flat.items() if not k.startswith("projection_")}
    projection = {k[len("projection_"):]: v for k, v in flat.items() if k.startswith("projection_")}
    return {**nested, "projection": projection} if projection else nested


def merge_settings(*layers: dict[str, Any]) -> dict[str, Any]:
    """Config dicts, later ones winning field by field (the `projection` fields too)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        earlier, later = merged.get("projection"), layer.get("projection")
        merged.update(layer)
        if isinstance(earlier, dict) and isinstance(later, dict):
            merged["projection"] = {**earlier, **later}
    return merged


def preset(name: str, **overrides: Any) -> TrainConfig:
    """The published recipes: `gnsp` (the official recipe, `GNSP_RECIPE`), `gnsp-exact` (update
    projection, all maps); any other name is a method with the default settings."""
    if name not in PRESETS:
        return TrainConfig().replace(method=name, **overrides)
    return TrainConfig().replace(**{**PRESETS[name], **overrides})
