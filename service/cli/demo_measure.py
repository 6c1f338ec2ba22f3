"""What the demo reads off a model besides task accuracy: the held-out suite's pooled zero-shot
accuracy, its retrieval R@1/R@5 and the modality gap, measured in this process on a loaded model
(the REST path uses it where a version's metrics do not carry the number)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gnsp_core.data import Task
from gnsp_core.data.heldout import PAIRS_NAME, HeldoutSuite
from gnsp_core.evaluation import class_prompt_gap, heldout_metrics, task_accuracy
from gnsp_core.models.spec import LoadedModel


@dataclass
class Measures:
    """One model's column: accuracy per task, held-out suite, retrieval and modality gap."""

    tasks: dict[str, float] = field(default_factory=dict)
    heldout: float | None = None
    retrieval: dict[str, float] | None = None
    """`R@1`, `R@5`: mean of image->text and text->image recall on the held-out caption pairs."""
    gap: float | None = None
    gap_vector: torch.Tensor | None = None
    sources: dict[str, str] = field(default_factory=dict)


def suite_items(suite: HeldoutSuite) -> int:
    """Zero-shot test items of the suite (every set, not the retrieval pairs)."""
    return sum(n for name, n in suite.sizes.items() if name != PAIRS_NAME)


def zero_shot(loaded: LoadedModel, suite: HeldoutSuite, device: str | torch.device = "cpu",
              reference_gap: torch.Tensor | None = None) -> dict[str, Any]:
    """Held-out accuracy (pooled over every item), retrieval R@1/R@5 and the gap of one model."""
    held = heldout_metrics(loaded, suite, device)
    return {"heldout": held["heldout_acc"], "retrieval": {"R@1": held["retrieval_r1"], "R@5": held["retrieval_r5"]},
            **modality_gap(loaded, suite, device, reference_gap)}


def modality_gap(loaded: LoadedModel, suite: HeldoutSuite, device: str | torch.device = "cpu",
                 reference_gap: torch.Tensor | None = None) -> dict[str, Any]:
    """The gap between the suite's photos and their class prompts (`gap`, its norm) and the vector."""
    gap = class_prompt_gap(loaded, suite.photo_tasks[0], device, reference_gap)
    return {"gap": gap["norm"], "gap_vector": gap["gap"]}


def local_measures(loaded: LoadedModel, tasks: list[Task], suite: HeldoutSuite, extras: dict | None = None,
                   device: str | torch.device = "cpu", reference_gap: torch.Tensor | None = None) -> Measures:
    """Every number of a table column, measured on `loaded` in this process."""
    accs = {t.name: task_accuracy(loaded, t, extras, device=device) for t in tasks}
    return Measures(tasks=accs, **zero_shot(loaded, suite, device, reference_gap))
