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
from gnsp_core.data.heldout import HeldoutSuite
from gnsp_core.errors import StateError
from gnsp_core.evaluation import heldout_metrics, task_accuracy
from gnsp_core.models import DEFAULT_MODEL, LoadedModel, ModelSpec, load_model
from gnsp_core.models.inference import prepare_image_tower
from gnsp_core.state import ContinualState
from gnsp_core.trunk_memo import remembered_trunks

from service.settings import ServiceSettings
from service.training.sources import resolve_callable
from service.training.stored import frozen_outputs_folder
from service.store import ModelStore

log = logging.getLogger(__name__)


def model_spec(settings: ServiceSettings) -> ModelSpec:
    return ModelSpec(name=settings.model or DEFAULT_MODEL, pretrained=settings.pretrained, seed=settings.seed)


def load_state_model(state: ContinualState, device: str | torch.device = "cpu",
                     built: LoadedModel | None = None) -> LoadedModel:
    """The model of a stored state: its spec's architecture with the state's weights, in eval mode;
    filled into `built` (a model of that spec already built) when given."""
    loaded = built if built is not None else load_model(state.spec, device)
    try:
        loaded.model.load_state_dict(state.weights)
    except RuntimeError as exc:
        raise StateError(f"the stored weights do not fit {state.spec.name}: {exc}") from exc
    loaded.model.eval()
    return loaded


def load_heldout(spec: str | None) -> Task | HeldoutSuite | None:
    """What the quality gate measures (see ServiceSettings.heldout): 'builtin' is the held-out suite."""
    if spec is None or spec == "none":
        return None
    if spec == "builtin":
        from gnsp_core.data.heldout import load_heldout_suite

        return load_heldout_suite()
    if ":" in spec and not Path(spec).exists() and not spec.startswith("mtil:"):
        return resolve_callable(spec)()
    return load_task(spec)


def heldout_sizes(heldout: Task | HeldoutSuite | None) -> dict[str, int]:
    """Test items per held-out set: a stored accuracy is comparable only when these match."""
    if heldout is None:
        return {}
    return heldout.sizes if isinstance(heldout, HeldoutSuite) else {heldout.name: len(heldout.test)}


def measure_heldout(loaded: LoadedModel, heldout: Task | HeldoutSuite | None,
                    trunk_outputs: Path | None = None) -> dict[str, Any]:
    """Job metrics of the held-out set, in percent: `heldout_accuracy` (the gate's number; for the
    suite, top-1 pooled over its items), and for the suite `retrieval_r1`, `retrieval_r5`,
    `heldout_sets` and `retrieval` (see gnsp_core.evaluation.suite_summary); plus `heldout_sizes`.

    Every version is measured on the same set: with `trunk_outputs` (a node-local folder), the
    trunks' outputs for it are kept there (gnsp_core.trunk_memo), and a version whose trunks did
    not train runs only its heads on it."""
    if heldout is None:
        return {"heldout_accuracy": None}
    with remembered_trunks(loaded.model, trunk_outputs):
        if isinstance(heldout, Task):
            return {"heldout_accuracy": round(task_accuracy(loaded, heldout), 4),
                    "heldout_sizes": heldout_sizes(heldout)}
        held = heldout_metrics(loaded, heldout)
    return {"heldout_accuracy": round(held["heldout_acc"], 4), "retrieval_r1": round(held["retrieval_r1"], 4),
            "retrieval_r5": round(held["retrieval_r5"], 4),
            "heldout_sets": {k: round(v, 4) for k, v in held["heldout_sets"].items()},
            "retrieval": {k: round(v, 4) for k, v in held["retrieval"].items()}, "heldout_sizes": heldout.sizes}


def ensure_base_version(store: ModelStore, settings: ServiceSettings) -> int:
    """Version 1 (the pre-trained model) when the store is empty; the pointer set if a crash left none."""
    versions = store.versions()
    if not versions:
        spec = model_spec(settings)
        log.info("empty store %s: creating version 1 from %s", store.uri, spec)
        loaded = load_model(spec)
        state = ContinualState.initial(loaded.model, spec)
        # Measured as every evaluation measures a version, its trunk rows kept where this node's
        # priming and jobs read them (the suite's hundreds of images go through the trunks once).
        prepare_image_tower(loaded.model, loaded.image_size)
        heldout = measure_heldout(loaded, load_heldout(settings.heldout), frozen_outputs_folder(settings.work_dir))
        metrics = {"heldout": settings.heldout, **heldout}
        with tempfile.TemporaryDirectory(prefix="gnsp-base-", dir=settings.scratch()) as tmp:
            folder = state.save(Path(tmp) / "state")
            manifest = {"parent": None, "task_id": None, "task": None, "method": None, "tasks": [],
                        "spec": spec.to_dict(), "metrics": metrics}
            versions = [store.publish_version(folder, manifest)]
    if store.active() is None:
        store.set_active(versions[0], "base model")
    return store.active()


def evaluate_version(state_dir: Path, task_dir: Path | None, heldout_spec: str | None,
                     trunk_outputs: Path | None = None) -> dict[str, Any]:
    """New-task accuracy on the task's test split and held-out zero-shot accuracy, in percent
    (`trunk_outputs`: see `measure_heldout`)."""
    state = ContinualState.load(state_dir)
    loaded = load_state_model(state)
    prepare_image_tower(loaded.model, loaded.image_size)  # measured, never trained: the faster same function
    metrics: dict[str, Any] = {"heldout": heldout_spec}
    if task_dir is not None:
        task = load_task(str(task_dir))
        metrics["task_accuracy"] = round(task_accuracy(loaded, task, state.extras), 4)
    metrics.update(measure_heldout(loaded, load_heldout(heldout_spec), trunk_outputs))
    return metrics


def base_heldout_accuracy(store: ModelStore, version: int, heldout_spec: str | None, cache: Path,
                          trunk_outputs: Path | None = None) -> float | None:
    """The base version's held-out accuracy: from its manifest when measured on the same sets (same
    spec and sizes), else now."""
    metrics = store.manifest(version).get("metrics", {})
    same_sets = metrics.get("heldout_sizes", {}) == heldout_sizes(load_heldout(heldout_spec))
    if metrics.get("heldout") == heldout_spec and same_sets and "heldout_accuracy" in metrics:
        return metrics["heldout_accuracy"]
    return evaluate_version(store.fetch_version(version, cache), None, heldout_spec, trunk_outputs)["heldout_accuracy"]
