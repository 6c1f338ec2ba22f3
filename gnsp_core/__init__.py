"""gnsp_core: continual learning for CLIP models with gradient null space projection.

Pure PyTorch + open_clip (no Ray, no HTTP). The names below are the public API; each is imported
from its module on first use, so `import gnsp_core.evaluation` (or any single module) never pulls
in the training stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ContinualState": "gnsp_core.state",
    "ModelSpec": "gnsp_core.models.spec",
    "LoadedModel": "gnsp_core.models.spec",
    "load_model": "gnsp_core.models.loading",
    "Task": "gnsp_core.data.samples",
    "load_task": "gnsp_core.data.sources",
    "load_reference_pairs": "gnsp_core.data.reference",
    "load_heldout_suite": "gnsp_core.data.heldout",
    "heldout_metrics": "gnsp_core.evaluation",
    "TrainConfig": "gnsp_core.config",
    "preset": "gnsp_core.config",
    "learn_task": "gnsp_core.trainer",
    "Progress": "gnsp_core.task_context",
    "task_accuracy": "gnsp_core.evaluation",
    "mtil_metrics": "gnsp_core.metrics",
    "METHODS": "gnsp_core.methods.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gnsp_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
