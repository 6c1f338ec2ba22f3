"""MG-CLIP: mind the modality gap (preserve it by early stopping, compensate it with a classifier).

From the official recipe: one shared LoRA (rank 8, alpha 1) on the attention K and V projections of
both towers, never reset; everything else frozen; cross-entropy over the current task's classes with
"a good photo of a {}."; training stops at the first check where the mean negative-pair logit has
moved by more than α (10 %) relative to its value before the first task, and that step count is used
for every later task; after each task a cosine classifier in image-embedding space (one row per class,
from class-mean embeddings) is fitted with CLIP frozen and combined with the zero-shot head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gnsp_core import losses
from gnsp_core.feature_cache import VAL_VIEW
from gnsp_core.methods.base import Method
from gnsp_core.methods.mgclip_head import CosineCompensationHead

TEMPLATE = "a good photo of a {}."
STEPS_KEY = "mgclip.steps"


def mean_negative_logit(
    image_features: Tensor, class_text_features: Tensor, labels: Tensor, logit_scale: float = 100.0
) -> float:
    """MG-CLIP's gap signal: mean over images of the mean logit_scale · cos to the OTHER classes' prompts."""
    logits = losses.cosine_logits(image_features.detach(), class_text_features.detach(), logit_scale)
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError("the mean negative logit needs at least two classes")
    negatives = torch.ones_like(logits, dtype=torch.bool)
    negatives[torch.arange(len(labels)), labels.to(logits.device)] = False
    return (logits * negatives).sum(dim=1).div(num_classes - 1).mean().item()


class GapMonitor:
    """MG-CLIP's adaptive early stop: stop once the mean negative logit moved by more than alpha.

    Record the value before training on the first task (`record_baseline`), then ask
    `should_stop(value)` after each epoch (in MTIL: every N iterations). Stop when
    |value − baseline| / |baseline| > alpha; the caller reuses that epoch count for later tasks.
    """

    def __init__(self, alpha: float = 0.10, baseline: float | None = None) -> None:
        self.alpha = alpha
        self.baseline = baseline

    def record_baseline(self, value: float) -> None:
        self.baseline = float(value)

    def relative_change(self, value: float) -> float:
        if self.baseline is None:
            raise RuntimeError("GapMonitor has no baseline: call record_baseline() before training")
        if self.baseline == 0.0:
            return 0.0 if value == 0.0 else math.inf
        return abs(value - self.baseline) / abs(self.baseline)

    def should_stop(self, value: float) -> bool:
        return self.relative_change(value) > self.alpha


class LoRADelta(nn.Module):
    """W ↦ W + (α/r)·B A on a block of rows (K and V of a packed in-projection, or a whole Linear)."""

    def __init__(self, weight: torch.Tensor, rows: slice, rank: int, alpha: float) -> None:
        super().__init__()
        out_rows = len(range(*rows.indices(weight.shape[0])))
        self.rows, self.scale = rows, alpha / rank
        self.A = nn.Parameter(torch.randn(rank, weight.shape[1], device=weight.device) / weight.shape[1] ** 0.5)
        self.B = nn.Parameter(torch.zeros(out_rows, rank, device=weight.device))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        full = torch.zeros_like(weight)
        full[self.rows] = self.scale * (self.B @ self.A)
        return full

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta(weight)


def _kv_targets(model: nn.Module) -> list[tuple[str, nn.Module, str, slice]]:
    """(name, module, parameter, rows) for every attention K/V weight in both towers."""
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            d = module.embed_dim
            targets.append((name, module, "in_proj_weight", slice(d, 3 * d)))
        elif isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("key", "value", "k_proj", "v_proj"):
            targets.append((name, module, "weight", slice(None)))
    return targets


class MGCLIP(Method):
    name = "mgclip"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.class_tokens = ctx.tokens([TEMPLATE.format(c) for c in ctx.task.classnames])

    def begin_task(self) -> None:
        self.model.requires_grad_(False)
        self.loras: list[tuple[str, nn.Module, str, LoRADelta]] = []
        extras = self.ctx.state.extras
        for name, module, pname, rows in _kv_targets(self.model):
            lora = LoRADelta(getattr(module, pname), rows, self.cfg.lora_rank, self.cfg.lora_alpha)
            if f"mgclip.lora.{name}.A" in extras:  # shared LoRA, never reset: continue from the last task
                lora.A.data.copy_(extras[f"mgclip.lora.{name}.A"])
                lora.B.data.copy_(extras[f"mgclip.lora.{name}.B"])
            with torch.no_grad():  # saved weights are merged; un-merge so W + BA is unchanged
                getattr(module, pname).sub_(lora.delta(getattr(module, pname)))
            parametrize.register_parametrization(module, pname, lora)
            self.loras.append((name, module, pname, lora))
        if not self.loras:
            raise ValueError("MG-CLIP found no attention K/V projections to adapt in this model")
        self.fixed_steps = int(extras[STEPS_KEY]) if STEPS_KEY in extras else None
        self.monitor = GapMonitor(self.cfg.gap_alpha) if self.fixed_steps is None else None
        self.stopped_at: int | None = None
        if self.monitor is not None:
            self.monitor.record_baseline(self._negative_logit())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, _, _, lora in self.loras for p in (lora.A, lora.B)]

    def total_steps(self) -> int:
        return min(self.cfg.steps, self.fixed_steps) if self.fixed_steps else self.cfg.steps

    @torch.no_grad()
    def _negative_logit(self) -> float:
        train = self.ctx.task.train
        chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.cfg.seed))[:64].tolist()
        images = self.ctx.task_images(chosen, VAL_VIEW)
        labels = torch.tensor([train.labels[i] for i in chosen], device=self.ctx.device)
        img = nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)
        txt = nn.functional.normalize(self.model.encode_text(self.class_tokens).float(), dim=-1)
        return mean_negative_logit(img, txt, labels, self.cfg.logit_scale)

    def stop_early(self, step: int) -> bool:
        if self.monitor is None or step % self.cfg.gap_check_every:
            return False
        if self.monitor.should_stop(self._negative_logit()):
            self.stopped_at = step
            return True
        return False

    @torch.no_grad()
    def end_task(self) -> None:
        self.lora_tensors = {}
        for name, module, pname, lora in self.loras:
            parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
            self.lora_tensors[f"mgclip.lora.{name}.A"] = lora.A.detach().cpu()
            self.lora_tensors[f"mgclip.lora.{name}.B"] = lora.B.detach().cpu()
        self.head = self._fit_compensation()

    def _fit_compensation(self) -> CosineCompensationHead:
        train = self.ctx.task.train
        chunks = [range(i, min(i + 64, len(train))) for i in range(0, len(train), 64)]
        feats = torch.cat([self.model.encode_image(self.ctx.task_images(c, VAL_VIEW)).float() for c in chunks])
        labels = torch.tensor(train.labels, device=self.ctx.device)
        head = CosineCompensationHead(feats.shape[1]).to(self.ctx.device)
        head.add_classes(feats, labels)
        with torch.enable_grad():
            head.fit(feats, labels, epochs=self.cfg.compensation_epochs, seed=self.cfg.seed)
        return head

    def extras(self) -> dict[str, torch.Tensor]:
        out = {**self.ctx.state.extras, **self.lora_tensors}
        out[f"mgclip.comp.{self.ctx.task.name}"] = self.head.weight.detach().cpu()
        if self.fixed_steps is None:
            out[STEPS_KEY] = torch.tensor(self.stopped_at or self.cfg.steps)
        return out
