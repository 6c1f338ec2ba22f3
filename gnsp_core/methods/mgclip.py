"""MG-CLIP: mind the modality gap (preserve it by early stopping, compensate it with a classifier).

From the official recipe: LoRA (rank 8, alpha 1) on the attention K and V projections of both towers,
a pair (A, B) of its own for K and one for V, never reset; everything else frozen; cross-entropy over the current task's classes with
"a good photo of a {}."; training stops at the first check where the mean negative-pair logit has
moved by more than α (10 %) relative to its value before the first task, and that step count is used
for every later task; after each task a cosine classifier in image-embedding space (one row per class,
from class-mean embeddings) is fitted with CLIP frozen and combined with the zero-shot head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gnsp_core import losses
from gnsp_core.errors import ConfigError
from gnsp_core.feature_cache import VAL_VIEW
from gnsp_core.methods.base import Method
from gnsp_core.methods.mgclip_head import COMPENSATION_WEIGHT_KEY, CosineCompensationHead

TEMPLATE = "a good photo of a {}."
STEPS_KEY = "mgclip.steps"
LORA_PREFIX = "mgclip.lora."


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
    """W ↦ W + (α/r)·B A on a block of rows (K or V of a packed in-projection, or a whole weight).

    As in loralib: A [r, in] Xavier-uniform, B [rows, r] zero, so the adapted model starts as the
    model itself."""

    def __init__(self, weight: torch.Tensor, rows: slice, rank: int, alpha: float) -> None:
        super().__init__()
        out_rows = len(range(*rows.indices(weight.shape[0])))
        self.rows, self.scale = rows, alpha / rank
        self.A = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, weight.shape[1], device=weight.device)))
        self.B = nn.Parameter(torch.zeros(out_rows, rank, device=weight.device))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        full = torch.zeros_like(weight)
        full[self.rows] = self.scale * (self.B @ self.A)
        return full

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta(weight)


@dataclass
class _Target:
    """One K or V weight (a block of rows of a parameter) that gets its own LoRA pair."""

    name: str
    """`module name.k` or `.v`: the prefix of its A and B in the state's extras."""
    module: nn.Module
    param: str
    rows: slice


_KV_LINEARS = {"key": "k", "k_proj": "k", "value": "v", "v_proj": "v"}


def _kv_targets(model: nn.Module) -> list[_Target]:
    """Every attention K and V weight in both towers, each a target of its own."""
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            d = module.embed_dim
            if module.in_proj_weight is not None:  # packed [q; k; v]
                targets += [_Target(f"{name}.k", module, "in_proj_weight", slice(d, 2 * d)),
                            _Target(f"{name}.v", module, "in_proj_weight", slice(2 * d, 3 * d))]
            else:
                targets += [_Target(f"{name}.k", module, "k_proj_weight", slice(None)),
                            _Target(f"{name}.v", module, "v_proj_weight", slice(None))]
        elif isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in _KV_LINEARS:
            targets.append(_Target(f"{name}.{_KV_LINEARS[name.rsplit('.', 1)[-1]]}", module, "weight", slice(None)))
    return targets


class MGCLIP(Method):
    name = "mgclip"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.class_tokens = ctx.tokens([TEMPLATE.format(c) for c in ctx.task.classnames])

    def begin_task(self) -> None:
        if self.cfg.compensation_weight < 0:
            raise ConfigError(f"compensation_weight must be >= 0 (the paper uses 4), got {self.cfg.compensation_weight}")
        self.model.requires_grad_(False)
        self.loras = self._attach_loras()
        if not self.loras:
            raise ValueError("MG-CLIP found no attention K/V projections to adapt in this model")
        extras = self.ctx.state.extras
        self.fixed_steps = int(extras[STEPS_KEY]) if STEPS_KEY in extras else None
        self.monitor = GapMonitor(self.cfg.gap_alpha) if self.fixed_steps is None else None
        self.stopped_at: int | None = None
        if self.monitor is not None and self.ctx.distributed.rank == 0:  # rank 0 decides for all
            self.monitor.record_baseline(self._negative_logit())

    def _attach_loras(self) -> list[tuple[_Target, LoRADelta]]:
        """One LoRA pair per K and V weight, continuing from the last task's (never reset)."""
        extras = self.ctx.state.extras
        loras = []
        for target in _kv_targets(self.model):
            lora = LoRADelta(getattr(target.module, target.param), target.rows, self.cfg.lora_rank, self.cfg.lora_alpha)
            if f"{LORA_PREFIX}{target.name}.A" in extras:
                lora.A.data.copy_(extras[f"{LORA_PREFIX}{target.name}.A"])
                lora.B.data.copy_(extras[f"{LORA_PREFIX}{target.name}.B"])
            loras.append((target, lora))
        with torch.no_grad():  # saved weights are merged: un-merge (all pairs of a weight first) so W + ΣBA is unchanged
            for target, lora in loras:
                weight = getattr(target.module, target.param)
                weight.sub_(lora.delta(weight))
        for target, lora in loras:  # K's and V's parametrizations of one packed weight chain
            parametrize.register_parametrization(target.module, target.param, lora)
        return loras

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, lora in self.loras for p in (lora.A, lora.B)]

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
        """Rank 0 measures the gap and decides; every rank gets that one decision (one all-reduce at
        each check), so no rank stops while another waits in its next gradient all-reduce."""
        if self.monitor is None or step % self.cfg.gap_check_every:
            return False
        dist = self.ctx.distributed
        stop = dist.rank == 0 and self.monitor.should_stop(self._negative_logit())
        if dist.rank0_decides(stop, self.ctx.device):
            self.stopped_at = step
            return True
        return False

    @torch.no_grad()
    def end_task(self) -> None:
        self.lora_tensors = {}
        for target, lora in self.loras:
            if parametrize.is_parametrized(target.module, target.param):  # once per weight: removes K's and V's
                parametrize.remove_parametrizations(target.module, target.param, leave_parametrized=True)
            self.lora_tensors[f"{LORA_PREFIX}{target.name}.A"] = lora.A.detach().cpu()
            self.lora_tensors[f"{LORA_PREFIX}{target.name}.B"] = lora.B.detach().cpu()
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
        kept = {k: v for k, v in self.ctx.state.extras.items() if not k.startswith(LORA_PREFIX)}  # incl. older layouts
        out = {**kept, **self.lora_tensors}
        out[f"mgclip.comp.{self.ctx.task.name}"] = self.head.weight.detach().cpu()
        out[COMPENSATION_WEIGHT_KEY] = torch.tensor(float(self.cfg.compensation_weight))
        if self.fixed_steps is None:
            out[STEPS_KEY] = torch.tensor(self.stopped_at or self.cfg.steps)
        return out
