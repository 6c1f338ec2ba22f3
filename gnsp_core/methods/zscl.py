"""ZSCL-style (Zheng et al.): distil the pre-trained model on reference pairs, average weights along the way."""

from __future__ import annotations

from typing import Any

import torch

from gnsp_core import losses
from gnsp_core.methods.base import Method


class ZSCL(Method):
    """ZSCL-style: distil the pre-trained model's image features and image-text similarities on
    reference pairs, and average the weights along the trajectory (weight ensembling)."""

    name = "zscl"
    uses_reference = True

    def begin_task(self) -> None:
        super().begin_task()
        self.average: list[torch.Tensor] | None = None
        self.samples = 0

    def loss(self, images, labels):
        ref_images, _, ref_tokens = self.reference_batch()
        (img, ref_img), (txt, ref_txt) = self.ctx.encode([images, ref_images], [self.class_tokens, ref_tokens])
        base_img, base_txt = self.base_features(ref_images, ref_tokens)
        distill = losses.FeatureDistillation(T=self.cfg.cd_temperature, logit_scale=self.cfg.logit_scale)
        return {"ce": self.task_ce(img, txt, labels),
                "zscl": self.cfg.zscl_weight * distill(ref_img, ref_txt, base_img, base_txt)}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if (step + 1) % self.cfg.ensemble_every:
            return
        params = self.trainable_parameters()
        if self.average is None:
            self.average = [p.detach().clone() for p in params]
        else:
            for avg, p in zip(self.average, params):
                avg.mul_(self.samples / (self.samples + 1)).add_(p.detach() / (self.samples + 1))
        self.samples += 1

    @torch.no_grad()
    def end_task(self) -> None:
        if self.average is not None:
            for avg, p in zip(self.average, self.trainable_parameters()):
                p.copy_(avg)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"average": self.average, "samples": self.samples}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.average, self.samples = state.get("average"), state.get("samples", 0)
