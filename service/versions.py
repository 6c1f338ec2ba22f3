"""Model versions as PyTorch objects: build version 1, measure a version, serve a version.

This is the only service module that touches model weights. The store (service/store.py) moves
files; the job runner (service/jobs.py) decides; this module loads, evaluates and classifies.
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from gnsp_core.data import Task, load_task, to_rgb
from gnsp_core.errors import StateError
from gnsp_core.evaluation import task_accuracy
from gnsp_core.models import DEFAULT_MODEL, LoadedModel, ModelSpec, load_model
from gnsp_core.state import ContinualState
from gnsp_core.models.loading import resolve_device
from gnsp_core.zeroshot import TEMPLATES, TextHeadCache, model_device

from service.errors import InvalidImageError, VersionLoadError
from service.settings import ServiceSettings
from service.training.sources import resolve_callable
from service.store import ModelStore

log = logging.getLogger(__name__)
LOGIT_SCALE = 100.0


def model_spec(settings: ServiceSettings) -> ModelSpec:
    return ModelSpec(name=settings.model or DEFAULT_MODEL, pretrained=settings.pretrained, seed=settings.seed)


def load_state_model(state: ContinualState, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a stored state: its spec's architecture with the state's weights, in eval mode."""
    loaded = load_model(state.spec, device)
    try:
        loaded.model.load_state_dict(state.weights)
    except RuntimeError as exc:
        raise StateError(f"the stored weights do not fit {state.spec.name}: {exc}") from exc
    loaded.model.eval()
    return loaded


def load_heldout(spec: str | None) -> Task | None:
    """The held-out zero-shot set the quality gate measures (see ServiceSettings.heldout)."""
    if spec is None or spec == "none":
        return None
    if spec == "builtin":
        from gnsp_core.data.reference import load_heldout_task

        return load_heldout_task()
    if ":" in spec and not Path(spec).exists() and not spec.startswith("mtil:"):
        return resolve_callable(spec)()
    return load_task(spec)


def heldout_accuracy(loaded: LoadedModel, heldout: Task | None) -> float | None:
    return None if heldout is None else round(task_accuracy(loaded, heldout), 4)


def ensure_base_version(store: ModelStore, settings: ServiceSettings) -> int:
    """Version 1 (the pre-trained model) when the store is empty; the pointer set if a crash left none."""
    versions = store.versions()
    if not versions:
        spec = model_spec(settings)
        log.info("empty store %s: creating version 1 from %s", store.uri, spec)
        loaded = load_model(spec)
        state = ContinualState.initial(loaded.model, spec)
        heldout = load_heldout(settings.heldout)
        metrics = {"heldout": settings.heldout, "heldout_accuracy": heldout_accuracy(loaded, heldout)}
        with tempfile.TemporaryDirectory(prefix="gnsp-base-", dir=settings.work_dir) as tmp:
            folder = state.save(Path(tmp) / "state")
            manifest = {"parent": None, "task_id": None, "task": None, "method": None, "tasks": [],
                        "spec": spec.to_dict(), "metrics": metrics}
            versions = [store.publish_version(folder, manifest)]
    if store.active() is None:
        store.set_active(versions[0], "base model")
    return store.active()


def evaluate_version(state_dir: Path, task_dir: Path | None, heldout_spec: str | None) -> dict[str, Any]:
    """New-task accuracy on the task's test split and held-out zero-shot accuracy, in percent."""
    state = ContinualState.load(state_dir)
    loaded = load_state_model(state)
    metrics: dict[str, Any] = {"heldout": heldout_spec}
    if task_dir is not None:
        task = load_task(str(task_dir))
        metrics["task_accuracy"] = round(task_accuracy(loaded, task, state.extras), 4)
    metrics["heldout_accuracy"] = heldout_accuracy(loaded, load_heldout(heldout_spec))
    return metrics


def base_heldout_accuracy(store: ModelStore, version: int, heldout_spec: str | None, cache: Path) -> float | None:
    """The base version's held-out accuracy: from its manifest when measured on the same set, else now."""
    metrics = store.manifest(version).get("metrics", {})
    if metrics.get("heldout") == heldout_spec and "heldout_accuracy" in metrics:
        return metrics["heldout_accuracy"]
    return evaluate_version(store.fetch_version(version, cache), None, heldout_spec)["heldout_accuracy"]


@dataclass
class ServedModel:
    """One loaded version in a classifier replica."""

    version: int
    loaded: LoadedModel

    @torch.no_grad()
    def classify(self, requests: list[dict[str, Any]], heads: TextHeadCache,
                 pool: Executor | None = None) -> list[dict[str, Any]]:
        """Answer several requests with one image-tower pass; each request has its own labels.

        With a `pool`, a batch's images are decoded and preprocessed in parallel (Pillow releases
        the GIL while it decodes and resizes): on a GPU this, not the forward, bounds a batch."""
        raws = [raw for request in requests for raw in request["images"]]
        tensors = pool.map(self._pixels, raws) if pool is not None and len(raws) > 1 else map(self._pixels, raws)
        pixels = torch.stack(list(tensors)).to(model_device(self.loaded.model))
        features = F.normalize(self.loaded.model.encode_image(pixels).float(), dim=-1)
        answers, start = [], 0
        for request in requests:
            labels = request["labels"]
            count = len(request["images"])
            head = heads.get(self.loaded.model, self.loaded.tokenizer, labels, TEMPLATES, key=self.version)
            probs = (LOGIT_SCALE * features[start:start + count] @ head.T).softmax(dim=-1)
            start += count
            answers.append({"model_version": self.version, "results": [_result(labels, row) for row in probs.tolist()]})
        return answers

    def _pixels(self, raw: bytes) -> torch.Tensor:
        return self.loaded.preprocess_val(decode_image(raw))

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


def decode_image(raw: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return to_rgb(image)
    except Exception as exc:  # PIL signals undecodable data with many exception types
        raise InvalidImageError(f"an image could not be decoded ({type(exc).__name__})") from None


def load_served_model(store: ModelStore, version: int, cache_dir: Path, device: str = "auto") -> ServedModel:
    """Load a stored version for serving (on the replica's GPU when Ray gave it one); any failure is
    a VersionLoadError (the old version keeps serving)."""
    folder = store.fetch_version(version, cache_dir)
    try:
        state = ContinualState.load(folder)
        return ServedModel(version, load_state_model(state, resolve_device(device)))
    except Exception as exc:  # a corrupt file can fail in safetensors, torch or open_clip
        raise VersionLoadError(f"model version {version} failed to load: {type(exc).__name__}: {exc}") from exc
