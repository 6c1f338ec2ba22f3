"""Learning without Forgetting (Li & Hoiem): distil the previous model on the new task's images."""

from __future__ import annotations

import copy

import torch
from torch import nn

from gnsp_core import losses
from gnsp_core.methods.base import Method


class LwF(Method):
    """Learning without Forgetting: distil the previous model's logits on the new task's images,
    over the prompts of every class seen so far plus the new ones."""

    name = "lwf"

    def begin_task(self) -> None:
        super().begin_task()
        self.previous: nn.Module | None = None
        names = self.ctx.state.seen_classnames()
        names += [c for c in self.ctx.task.classnames if c not in names]
        self.all_tokens = self.ctx.tokens([self.template.format(c) for c in names])
        self.current = torch.tensor([names.index(c) for c in self.ctx.task.classnames], device=self.ctx.device)

    def loss(self, images, labels):
        if self.previous is None:  # copied at the first step, once the trainer set up the feature cache
            self.previous = copy.deepcopy(self.model).eval().requires_grad_(False)
        (img,), (txt,) = self.ctx.encode([images], [self.all_tokens])
        with torch.no_grad():
            old_img = nn.functional.normalize(self.previous.encode_image(images).float(), dim=-1)
            old_txt = nn.functional.normalize(self.previous.encode_text(self.all_tokens).float(), dim=-1)
        scale = self.cfg.logit_scale
        kd = losses.kd_loss(scale * old_img @ old_txt.T, scale * img @ txt.T, T=self.cfg.cd_temperature)
        return {"ce": self.task_ce(img, txt[self.current], labels), "lwf": self.cfg.lwf_weight * kd}
