"""GNSP: gradient null space projection with contrastive distillation and modality alignment preservation."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Subset

from gnsp_core import losses
from gnsp_core.feature_cache import VAL_VIEW
from gnsp_core.linear_maps import LinearMapSet
from gnsp_core.methods.base import Method, freeze_batchnorm_statistics
from gnsp_core.projection import CovarianceCollector, NullSpaceProjector, ProjectorStatistics, collect_statistics

_PROMPT_CHUNK = 256


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
        self.stats = self.ctx.state.stats.copy(proj.stored_as, proj.storage_energy)
        if self.stats.is_empty() and proj.seed_with_reference and self.ctx.reference is not None:
            self.stats.add_task(self._reference_statistics())
        self.projector = None
        if self.stats.is_empty() and self.cfg.first_task_full_finetune:
            super().begin_task()
            return
        self.model.requires_grad_(False)
        for weight in self.maps.parameters():
            weight.requires_grad_(True)
        freeze_batchnorm_statistics(self.model)
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

    def end_task(self) -> None:
        self.stats.add_task(self._task_statistics(), self.cfg.projection.renormalise_old)

    def statistics(self) -> ProjectorStatistics:
        return self.stats

    def _collect(self, batches, forward) -> dict[str, torch.Tensor]:
        dist = self.ctx.distributed
        return collect_statistics(self.maps, batches, forward, self.cfg.projection.stat_norm, dist.all_reduce)

    def _task_statistics(self) -> dict[str, torch.Tensor]:
        """One pass over this worker's share of the task (train augmentation, as in the paper), and,
        when text maps are protected, one over the class prompts of every template of the task.

        Protected maps inside a part the feature cache skips (a frozen trunk) would see no input:
        the pass then runs with the cache suspended, on pixels.
        """
        cache = self.ctx.feature_cache
        if cache is not None and any(cache.hides(w) for w in self.maps.parameters()):
            with cache.suspended():
                return self._statistics_pass(pixels=True)
        return self._statistics_pass(pixels=False)

    def _statistics_pass(self, pixels: bool) -> dict[str, torch.Tensor]:
        collector = CovarianceCollector(self.maps, self.cfg.projection.stat_norm)
        for batch in self._image_batches(pixels):
            collector.add_batch(lambda: self.model.encode_image(batch))
        if any(self.maps.is_text(name) for name in self.maps.names()):
            collector.add_batch(self._encode_all_prompts)  # one batch: all templates weigh alike
        return collector.task_matrices(self.ctx.distributed.all_reduce)

    def _image_batches(self, pixels: bool) -> Iterator[torch.Tensor]:
        ctx, cfg = self.ctx, self.cfg
        mine = range(ctx.distributed.rank, len(ctx.task.train), ctx.distributed.world_size)
        if ctx.caches_images:  # the training views' cache
            view = 0 if cfg.stats_augment else VAL_VIEW
            for i in range(0, len(mine), cfg.stats_batch_size):
                keys = ctx.task_images(mine[i:i + cfg.stats_batch_size], view)
                yield ctx.pixels(keys) if pixels else keys
            return
        transform = ctx.loaded.preprocess_train if cfg.stats_augment else ctx.loaded.preprocess_val
        shard = Subset(ctx.task.train.with_transform(transform), mine)
        for images, _ in DataLoader(shard, batch_size=cfg.stats_batch_size, num_workers=cfg.num_workers):
            yield images.to(ctx.device)

    def _encode_all_prompts(self) -> None:
        """Every evaluation template of the task for every class, in chunks (memory), as one batch."""
        prompts = [t.format(c) for t in self.ctx.task.templates for c in self.ctx.task.classnames]
        for i in range(0, len(prompts), _PROMPT_CHUNK):
            self.model.encode_text(self.ctx.tokens(prompts[i:i + _PROMPT_CHUNK]))

    def _reference_statistics(self) -> dict[str, torch.Tensor]:
        batches = [self.ctx.reference.next() for _ in range(max(1, len(self.ctx.reference.loader)))]
        forward = lambda b: self.model(b[0], self.ctx.tokens(b[1]))  # noqa: E731  (b = images, captions, index)
        return self._collect(batches, forward)
