"""Continual-learning methods as small classes behind one interface.

Hooks (Mammoth-style): `begin_task`, `loss(images, labels) -> {term: tensor}`, `after_backward`
(GNSP projects gradients here), `before_step`/`after_step` (GNSP's exact update projection),
`end_task` (GNSP collects statistics, WiSE-FT interpolates, MG-CLIP fits its compensation head).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from . import losses
from .linear_maps import LinearMapSet
from .models import trainable_pattern
from .projection import NullSpaceProjector, ProjectorStatistics, collect_statistics
from .trainer import TaskContext


def _freeze_batchnorm_statistics(model: nn.Module) -> None:
    """BatchNorm running statistics change with every forward and no projection protects them: freeze."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class Method:
    """Plain fine-tuning: the task loss on every parameter but the (fixed) logit scale."""

    name = "finetune"
    uses_reference = False
    """Whether its losses need reference image-caption pairs (distillation on data of no task)."""

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx, self.cfg, self.model = ctx, ctx.config, ctx.model
        prompts = [self.cfg.template.format(c) for c in ctx.task.classnames]
        self.class_tokens = ctx.tokens(prompts)

    # --- hooks -------------------------------------------------------------------------------
    def begin_task(self) -> None:
        allowed = re.compile(trainable_pattern(self.cfg.trainable, self.ctx.loaded.spec.name))
        for name, param in self.model.named_parameters():
            param.requires_grad_(bool(allowed.match(name)))
        self.model.logit_scale.requires_grad_(False)
        _freeze_batchnorm_statistics(self.model)

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
        return False

    def end_task(self, progress=None) -> None: ...

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
        return self.ctx.pretrained.features(images, tokens, self._ref_index.tolist())


class LwF(Method):
    """Learning without Forgetting: distil the previous model's logits on the new task's images,
    over the prompts of every class seen so far plus the new ones."""

    name = "lwf"

    def begin_task(self) -> None:
        super().begin_task()
        self.previous = copy.deepcopy(self.model).eval().requires_grad_(False)
        names = self.ctx.state.seen_classnames()
        names += [c for c in self.ctx.task.classnames if c not in names]
        self.all_tokens = self.ctx.tokens([self.cfg.template.format(c) for c in names])
        self.current = torch.tensor([names.index(c) for c in self.ctx.task.classnames], device=self.ctx.device)

    def loss(self, images, labels):
        (img,), (txt,) = self.ctx.encode([images], [self.all_tokens])
        with torch.no_grad():
            old_img = nn.functional.normalize(self.previous.encode_image(images).float(), dim=-1)
            old_txt = nn.functional.normalize(self.previous.encode_text(self.all_tokens).float(), dim=-1)
        scale = self.cfg.logit_scale
        kd = losses.kd_loss(scale * old_img @ old_txt.T, scale * img @ txt.T, T=self.cfg.cd_temperature)
        return {"ce": self.task_ce(img, txt[self.current], labels), "lwf": self.cfg.lwf_weight * kd}


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
        scale = self.cfg.logit_scale
        kd = losses.kd_loss(scale * base_img @ base_txt.T, scale * ref_img @ ref_txt.T, T=self.cfg.cd_temperature)
        feat = (ref_img - base_img).pow(2).sum(-1).mean()
        return {"ce": self.task_ce(img, txt, labels), "zscl": self.cfg.zscl_weight * (kd + feat)}

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
    def end_task(self, progress=None) -> None:
        if self.average is not None:
            for avg, p in zip(self.average, self.trainable_parameters()):
                p.copy_(avg)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"average": self.average, "samples": self.samples}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.average, self.samples = state.get("average"), state.get("samples", 0)


class WiSEFT(Method):
    """WiSE-FT: fine-tune, then interpolate every weight with the pre-trained model's."""

    name = "wise-ft"

    @torch.no_grad()
    def end_task(self, progress=None) -> None:
        alpha = self.cfg.wise_alpha
        base = self.ctx.base_model().state_dict()
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_((1 - alpha) * base[name].to(tensor) + alpha * tensor)


class GNSP(Method):
    """Gradient null space projection with contrastive distillation and modality alignment preservation.

    First task (with no statistics yet): full fine-tune of both towers, logit scale fixed. Later tasks:
    only the protected linear maps train, their updates restricted to the null space of every earlier
    task's inputs. LayerNorms, biases and embeddings are frozen then, since no projection can protect them.
    """

    name = "gnsp"
    uses_reference = True

    def begin_task(self) -> None:
        proj = self.cfg.projection
        self.maps = LinearMapSet(self.model, proj.scope)
        self.stats = ProjectorStatistics(dict(self.ctx.state.stats.covariances), self.ctx.state.stats.num_tasks)
        if self.stats.is_empty() and proj.seed_with_reference and self.ctx.reference is not None:
            self.stats.add_task(self._reference_statistics())
        self.projector = None
        if self.stats.is_empty() and self.cfg.first_task_full_finetune:
            super().begin_task()
            return
        self.model.requires_grad_(False)
        for weight in self.maps.parameters():
            weight.requires_grad_(True)
        _freeze_batchnorm_statistics(self.model)
        if not self.stats.is_empty():
            self.projector = NullSpaceProjector(self.maps, self.stats, proj)

    def loss(self, images, labels):
        ref_images, captions, ref_tokens = self.reference_batch()
        (img, ref_img), (txt, ref_txt) = self.ctx.encode([images, ref_images], [self.class_tokens, ref_tokens])
        base_img, base_txt = self.base_features(ref_images, ref_tokens)
        cd = losses.ContrastiveDistillation(self.cfg.cd_temperature)(ref_img, ref_txt, base_img, base_txt)
        keep = losses.ModalityAlignmentPreservation(self.cfg.label_smoothing, self.cfg.logit_scale)
        return {"ce": self.task_ce(img, txt, labels), "cd": self.cfg.cd_weight * cd,
                "map": self.cfg.map_weight * keep(ref_img, ref_txt, captions)}

    def after_backward(self) -> None:
        if self.projector is not None and self.cfg.projection.target == "gradient":
            self.projector.project_gradients()

    def before_step(self) -> None:
        if self.projector is not None and self.cfg.projection.target == "update":
            self.projector.snapshot()

    def after_step(self, step: int) -> None:
        if self.projector is not None and self.cfg.projection.target == "update":
            self.projector.project_updates()

    def end_task(self, progress=None) -> None:
        self.stats.add_task(self._task_statistics())

    def statistics(self) -> ProjectorStatistics:
        return self.stats

    def _collect(self, batches, forward) -> dict[str, torch.Tensor]:
        dist = self.ctx.distributed
        return collect_statistics(self.maps, batches, forward, self.cfg.projection.stat_norm, dist.all_reduce)

    def _task_statistics(self) -> dict[str, torch.Tensor]:
        """One pass over this worker's share of the task (train augmentation, as in the paper)."""
        from torch.utils.data import DataLoader, Subset

        ctx, cfg = self.ctx, self.cfg
        transform = ctx.loaded.preprocess_train if cfg.stats_augment else ctx.loaded.preprocess_val
        dataset = ctx.task.train.with_transform(transform)
        shard = Subset(dataset, range(ctx.distributed.rank, len(dataset), ctx.distributed.world_size))
        loader = DataLoader(shard, batch_size=cfg.stats_batch_size, num_workers=cfg.num_workers)
        image_stats = self._collect(loader, lambda b: self.model.encode_image(b[0].to(ctx.device)))
        text_stats = self._collect([self.class_tokens], self.model.encode_text)
        return {k: image_stats[k] + text_stats[k] for k in image_stats}

    def _reference_statistics(self) -> dict[str, torch.Tensor]:
        batches = [self.ctx.reference.next() for _ in range(max(1, len(self.ctx.reference.loader)))]
        forward = lambda b: self.model(b[0], self.ctx.tokens(b[1]))  # noqa: E731  (b = images, captions, index)
        return self._collect(batches, forward)


def _registry() -> dict[str, type[Method]]:
    from .mgclip import MGCLIP

    return {cls.name: cls for cls in (Method, LwF, ZSCL, WiSEFT, GNSP, MGCLIP)}


METHODS = ("finetune", "lwf", "zscl", "wise-ft", "mgclip", "gnsp")


def uses_reference(method: str) -> bool:
    """Whether `method` needs reference pairs, so callers load them only when they are used."""
    return _registry()[method].uses_reference


def build_method(ctx: TaskContext) -> Method:
    return _registry()[ctx.config.method](ctx)
