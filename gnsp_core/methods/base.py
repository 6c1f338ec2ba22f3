"""The interface every continual-learning method implements, and the pieces they share.

Hooks (Mammoth-style): `begin_task`, `loss(images, labels) -> {term: tensor}`, `after_backward`
(GNSP projects gradients here), `before_step`/`after_step` (GNSP's exact update projection),
`end_task` (GNSP collects statistics, WiSE-FT interpolates, MG-CLIP fits its compensation head).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gnsp_core import losses
from gnsp_core.models.spec import mark_trainable
from gnsp_core.projection import ProjectorStatistics
from gnsp_core.task_context import TaskContext


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """BatchNorm running statistics change with every forward and no projection protects them: freeze."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class Method:
    """The hooks of one method; the defaults are plain fine-tuning (the task loss on every parameter
    the `trainable` setting allows, the logit scale fixed), so a method overrides only what differs."""

    name: str
    uses_reference = False
    """Whether its losses need reference image-caption pairs (distillation on data of no task)."""

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx, self.cfg, self.model = ctx, ctx.config, ctx.model
        self.template = self.cfg.template or ctx.task.templates[0]
        """The training prompt: the config's, else the task's own first template."""
        prompts = [self.template.format(c) for c in ctx.task.classnames]
        self.class_tokens = ctx.tokens(prompts)

    # --- hooks -------------------------------------------------------------------------------
    def begin_task(self) -> None:
        mark_trainable(self.model, self.cfg.trainable, self.ctx.loaded.spec.name)
        self.model.logit_scale.requires_grad_(False)
        freeze_batchnorm_statistics(self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def total_steps(self) -> int:
        return self.cfg.steps

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        (img,), (txt,) = self.ctx.encode([images], [self.class_tokens])
        return {"ce": self.task_ce(img, txt, labels)}

    def after_backward(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self, step: int) -> None: ...

    def stop_early(self, step: int) -> bool:
        """Whether to end the task after `step`. Under several workers every rank must return the
        same answer (decide through `ctx.distributed.rank0_decides`), or the ranks that go on wait
        for the others in their next gradient all-reduce forever."""
        return False

    def end_task(self) -> None: ...

    # --- what the next state keeps -------------------------------------------------------------
    def statistics(self) -> ProjectorStatistics:
        return self.ctx.state.stats

    def extras(self) -> dict[str, torch.Tensor]:
        return dict(self.ctx.state.extras)

    def checkpoint_state(self) -> dict[str, Any]:
        return {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None: ...

    # --- shared pieces -------------------------------------------------------------------------
    def task_ce(self, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return losses.task_cross_entropy(img, txt, labels, self.cfg.logit_scale, self.cfg.label_smoothing)

    def reference_batch(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        if self.ctx.reference is None:
            raise ValueError(f"method {self.name!r} needs reference image-caption pairs; pass `reference=`")
        images, captions, self._ref_index = self.ctx.reference.next()
        return images, captions, self.ctx.tokens(captions)

    def base_features(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-trained model's features of the last reference batch, each pair computed once per run."""
        return self.ctx.pretrained.features(images, tokens, self._ref_index.tolist(), self.ctx.pixels,
                                            self.ctx.feature_cache)
