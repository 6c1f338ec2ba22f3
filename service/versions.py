"""Model versions as PyTorch objects: build version 1, load a stored version, measure one for the gate.

The store (service/store/) moves files; the job runner (service/jobs/) decides; this module and
the one that serves a loaded version (service/serving/served_model.py) are the only ones that
touch model weights.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from gnsp_core.data import Task, load_task
from gnsp_core.errors import StateError
from gnsp_core.evaluation import task_accuracy
from gnsp_core.models import DEFAULT_MODEL, LoadedModel, ModelSpec, load_model
from gnsp_core.state import ContinualState

from service.settings import ServiceSettings
from service.training.sources import resolve_callable
from service.store import ModelStore

log = logging.getLogger(__name__)


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
        with tempfile.TemporaryDirectory(prefix="gnsp-base-", dir=settings.scratch()) as tmp:
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
