"""The frozen pre-trained model and its features of reference pairs, shared by the tasks of a run.

Every task starts its distillation from the same pre-trained weights, and the reference pool is
fixed and unaugmented, so each pair's pre-trained features never change. Keeping them with the
reference pool (not with one task) means a sequence computes them once, not once per task; on
gnsp-mini that is about 2 s of a 5 s GNSP step from the second task on.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
from torch import nn

from gnsp_core.feature_cache import FeatureCache, is_keys
from gnsp_core.models.inference import image_probe, prepared_copy
from gnsp_core.models.loading import load_model
from gnsp_core.models.spec import ModelSpec

_BY_POOL: "weakref.WeakKeyDictionary[object, dict[tuple, PretrainedFeatures]]" = weakref.WeakKeyDictionary()


class PretrainedFeatures:
    """The pre-trained model of one spec on one device (loaded on first use) and a feature cache."""

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        self.spec, self.device = spec, device
        self._model: nn.Module | None = None
        self._image_tower: nn.Module | None = None
        self._pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def model(self) -> nn.Module:
        """The pre-trained model as it was built (WiSE-FT reads its weights)."""
        if self._model is None:
            self._model = load_model(self.spec, self.device).model.eval().requires_grad_(False)
        return self._model

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Its image features from a copy prepared for inference where it has one (the same
        function, about half the time on gnsp-mini's EfficientNet), made on first use: a model
        whose trunks are lent from the feature cache never needs it."""
        model = self.model()
        if self._image_tower is None:
            prepared = prepared_copy(model.visual, image_probe(pixels.shape[-1], self.device))
            self._image_tower = model.visual if prepared is None else prepared
        if self._image_tower is model.visual:
            return model.encode_image(pixels)
        return self._image_tower(pixels.contiguous(memory_format=torch.channels_last))

    @torch.no_grad()
    def features(self, images: torch.Tensor, tokens: torch.Tensor, index: Sequence[int],
                 pixels: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 frozen: FeatureCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text features of the pairs `index`; only unseen pairs are encoded.
        `pixels` turns the images into pixels first (the trained model may take cache keys instead).
        With the trained model's `frozen` feature cache, the parts this model shares with it (same
        weights) read that cache: one pass of a shared trunk serves both models."""
        missing = [i for i, k in enumerate(index) if k not in self._pairs]
        if missing:
            base = self.model()
            with frozen.lent_to(base) if frozen is not None else nullcontext(set()) as lent:
                if any(name.startswith("image:") for name in lent) and is_keys(images):
                    image_features = base.encode_image(images[missing])
                else:
                    image_features = self._encode_image(images[missing] if pixels is None else pixels(images[missing]))
                img = nn.functional.normalize(image_features.float(), dim=-1)
                txt = nn.functional.normalize(base.encode_text(tokens[missing]).float(), dim=-1)
            for j, i in enumerate(missing):
                self._pairs[index[i]] = (img[j], txt[j])
        return torch.stack([self._pairs[k][0] for k in index]), torch.stack([self._pairs[k][1] for k in index])


def pretrained_features(spec: ModelSpec, device: torch.device, pool: object | None) -> PretrainedFeatures:
    """The cache for `spec` on `device`, kept as long as the reference `pool` lives (fresh if None)."""
    if pool is None:
        return PretrainedFeatures(spec, device)
    caches = _BY_POOL.setdefault(pool, {})
    key = (spec, str(device))
    if key not in caches:
        caches[key] = PretrainedFeatures(spec, device)
    return caches[key]
