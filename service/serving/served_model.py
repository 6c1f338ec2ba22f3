"""One stored version loaded in a classifier replica: decode images, answer a batch, smoke-test a version.

An image is decoded only after its header says it is within the pixel limit, and a JPEG is decoded
at the smallest DCT scale that still covers the model's input (Pillow's draft mode): a 6000x6000
photo costs a 750x750 decode, not 36 million pixels, for a model that looks at 224x224.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from gnsp_core.data import to_rgb
from gnsp_core.data.folders import IMAGE_FORMATS
from gnsp_core.models import LoadedModel, ModelSpec, load_model
from gnsp_core.models.inference import (TracedTower, answers_alike, image_probe, prepare_image_tower,
                                        traced_tower)
from gnsp_core.models.loading import resolve_device
from gnsp_core.state import ContinualState
from gnsp_core.zeroshot import TEMPLATES, TextHeadCache, model_device

from service.errors import InvalidImageError, VersionLoadError
from service.store import ModelStore
from service.versions import load_state_model

LOGIT_SCALE = 100.0


@dataclass
class ServedModel:
    """One loaded version in a classifier replica."""

    version: int
    loaded: LoadedModel
    prepared: bool = False
    """Whether the image tower was prepared for serving (gnsp_core.models.inference): it then takes
    its batches in channels-last memory."""

    @torch.inference_mode()
    def classify(self, requests: list[dict[str, Any]], heads: TextHeadCache,
                 pool: Executor | None = None) -> list[dict[str, Any]]:
        """Answer several requests with one image-tower pass; each request has its own labels.

        A request brings its images as `pixels` (already decoded by `pixels`: the classifier does
        that per request, so one bad image fails only its own request) or as encoded `images`, and
        may bring its zero-shot `head` (the classifier builds it before the batch, so a new label
        set never holds up the requests batched with it)."""
        tensors = [r["pixels"] if "pixels" in r else self.pixels(r["images"], pool) for r in requests]
        batch = torch.cat(tensors).to(model_device(self.loaded.model))
        if self.prepared:
            batch = batch.contiguous(memory_format=torch.channels_last)
        features = F.normalize(self.loaded.model.encode_image(batch).float(), dim=-1)
        answers, start = [], 0
        for request, pixels in zip(requests, tensors):
            labels = request["labels"]
            count = len(pixels)
            head = request["head"] if "head" in request else self.head(labels, heads)
            probs = (LOGIT_SCALE * features[start:start + count] @ head.T).softmax(dim=-1)
            start += count
            answers.append({"model_version": self.version, "results": [_result(labels, row) for row in probs.tolist()]})
        return answers

    def head(self, labels: list[str], heads: TextHeadCache) -> torch.Tensor:
        """The zero-shot head of this version over `labels` (cached per version and label set)."""
        return heads.get(self.loaded.model, self.loaded.tokenizer, labels, TEMPLATES, key=self.version)

    def pixels(self, raws: list[bytes], pool: Executor | None = None) -> torch.Tensor:
        """Decode and preprocess one request's images; InvalidImageError names what failed. With a
        `pool` the images are decoded in parallel (Pillow releases the GIL while it decodes and resizes)."""
        tensors = pool.map(self.pixel, raws) if pool is not None and len(raws) > 1 else map(self.pixel, raws)
        return torch.stack(list(tensors))

    def pixel(self, raw: bytes, max_pixels: int | None = None) -> torch.Tensor:
        return self.loaded.preprocess_val(decode_image(raw, self.loaded.image_size, max_pixels))

    def check(self, heads: TextHeadCache) -> dict[str, Any]:
        """A smoke test before a version is served: one image, two labels, finite probabilities."""
        probe = io.BytesIO()
        Image.new("RGB", (32, 32), (128, 96, 64)).save(probe, format="PNG")
        answer = self.classify([{"images": [probe.getvalue()], "labels": ["a photo", "a drawing"]}], heads)[0]
        total = sum(answer["results"][0]["scores"].values())
        if not all(math.isfinite(p) for p in answer["results"][0]["scores"].values()) or abs(total - 1) > 1e-3:
            raise VersionLoadError(f"version {self.version} produced invalid probabilities {answer['results'][0]}")
        return {"version": self.version, "ok": True}


def _result(labels: list[str], probs: list[float]) -> dict[str, Any]:
    best = max(range(len(labels)), key=probs.__getitem__)
    return {"label": labels[best], "scores": {label: round(p, 6) for label, p in zip(labels, probs)}}


def decode_image(raw: bytes, size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """An RGB image from encoded bytes of an allowed format, refused before decoding when its header
    declares more than `max_pixels`; a JPEG is decoded at a reduced scale no smaller than `size`."""
    try:
        with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise InvalidImageError(f"an image is {width}x{height}, over the {max_pixels}-pixel limit; "
                                        "downscale it before sending")
            if size and image.format == "JPEG":
                image.draft("RGB", (size, size))
            image.load()
            return to_rgb(image)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError:
        raise InvalidImageError(f"an image declares more pixels than the {max_pixels}-pixel limit; "
                                "downscale it before sending") from None
    except Exception as exc:  # PIL signals undecodable data with many exception types
        raise InvalidImageError(f"an image could not be decoded ({type(exc).__name__}); "
                                f"send a complete {'/'.join(IMAGE_FORMATS)} image") from None


def load_served_model(store: ModelStore, version: int, cache_dir: Path, device: str = "auto",
                      prepare: bool = False) -> ServedModel:
    """Load a stored version for serving (on the replica's GPU when Ray gave it one); any failure is
    a VersionLoadError (the old version keeps serving). With `prepare` its image tower is made
    cheaper to run (batch norms folded, channels-last), as the classifier replicas serve it."""
    return VersionLoader(store, cache_dir, device, prepare, keep_templates=False).load(version)


class VersionLoader:
    """Loads stored versions for one classifier replica, building each architecture only once.

    Building a model (open_clip constructs and randomly initialises it, then reads its pre-trained
    weights) costs far more than filling it with a version's weights: on gnsp-mini 1.3 s of CPU
    against 0.1 s for a copy of an already built one. A replica that serves several versions of
    one model (pinned requests, every activation) therefore keeps one built, unprepared model
    per spec as a template and copies it, which keeps loads short while requests are served beside
    them. Not thread-safe: the classifier loads on one thread."""

    def __init__(self, store: ModelStore, cache_dir: Path, device: str = "auto", prepare: bool = True,
                 keep_templates: bool = True) -> None:
        self.store, self.cache_dir, self.device = store, cache_dir, resolve_device(device)
        self.prepare, self.keep_templates = prepare, keep_templates
        self.templates: dict[ModelSpec, LoadedModel] = {}
        self.traced: dict[ModelSpec, torch.jit.ScriptModule | None] = {}

    def load(self, version: int) -> ServedModel:
        """A stored version ready to serve; any failure is a VersionLoadError."""
        folder = self.store.fetch_version(version, self.cache_dir)
        try:
            state = ContinualState.load(folder)
            loaded = load_state_model(state, self.device, built=self._built(state.spec))
            prepared = self.prepare and prepare_image_tower(loaded.model, loaded.image_size)
            if prepared:
                self._serve_traced(state.spec, loaded)
            return ServedModel(version, loaded, prepared)
        except Exception as exc:  # a corrupt file can fail in safetensors, torch or open_clip
            raise VersionLoadError(f"model version {version} failed to load: {type(exc).__name__}: {exc}") from exc

    def _serve_traced(self, spec: ModelSpec, loaded: LoadedModel) -> None:
        """Replace the prepared image tower by its TorchScript graph (gnsp_core.models.inference.
        traced_tower), traced once per architecture: each version gets a copy of that graph (20 ms
        on gnsp-mini, against 1.5 s for a trace) filled with its own weights, checked against its
        eager tower on the probe; a tower that cannot be traced is served as it is."""
        visual = loaded.model.visual
        probe = image_probe(loaded.image_size, next(visual.parameters()).device).contiguous(
            memory_format=torch.channels_last)
        template = self.traced[spec] if spec in self.traced else traced_tower(visual, probe)
        if self.keep_templates:
            self.traced[spec] = template
        if template is None:
            return
        tower = copy.deepcopy(template)
        tower.load_state_dict(visual.state_dict())
        if answers_alike(tower, visual, probe):
            loaded.model.visual = TracedTower(tower, visual.image_size)

    def _built(self, spec: ModelSpec) -> LoadedModel:
        """A model of `spec` to fill with a version's weights: a copy of the template, else built."""
        template = self.templates.get(spec)
        if template is None:
            template = load_model(spec, self.device)
            if not self.keep_templates:
                return template
            self.templates[spec] = template
        return dataclasses.replace(template, model=copy.deepcopy(template.model))
