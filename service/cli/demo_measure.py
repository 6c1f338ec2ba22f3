"""What the demo reads off a model besides task accuracy: held-out zero-shot accuracy, retrieval and
the modality gap, measured in this process on a loaded model (the REST path uses it where a
version's metrics do not carry the number)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gnsp_core.data import Task
from gnsp_core.data.reference import load_heldout_task
from gnsp_core.evaluation import class_prompt_gap, task_accuracy
from gnsp_core.models.spec import LoadedModel


@dataclass
class Measures:
    """One model's row values: accuracy per task, held-out suite, retrieval and modality gap."""

    tasks: dict[str, float] = field(default_factory=dict)
    heldout: float | None = None
    retrieval: dict[str, float] | None = None
    """`R@1`, `R@5`: mean of image->text and text->image recall on held-out caption pairs."""
    gap: float | None = None
    gap_vector: torch.Tensor | None = None
    sources: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HeldoutSets:
    """The zero-shot data the demo scores: the held-out task(s) and caption pairs, and their sizes."""

    tasks: list[Task]
    pairs: Any | None
    gap_task: Task

    @property
    def items(self) -> int:
        return sum(len(t.test) for t in self.tasks)


def load_heldout_sets() -> HeldoutSets:
    photos = load_heldout_task()
    return HeldoutSets(tasks=[photos], pairs=None, gap_task=photos)


def zero_shot(loaded: LoadedModel, sets: HeldoutSets, device: str | torch.device = "cpu",
              reference_gap: torch.Tensor | None = None) -> dict[str, Any]:
    """Held-out accuracy (pooled over every item), retrieval R@1/R@5 and the gap of one model."""
    correct = sum(task_accuracy(loaded, t, device=device) * len(t.test) for t in sets.tasks)
    retrieval = None
    if sets.pairs is not None:
        from gnsp_core.evaluation import pair_retrieval

        recall = pair_retrieval(loaded, sets.pairs, device)
        retrieval = {f"R@{k}": (recall[f"i2t_R@{k}"] + recall[f"t2i_R@{k}"]) / 2 for k in (1, 5)}
    gap = class_prompt_gap(loaded, sets.gap_task, device, reference_gap)
    return {"heldout": correct / max(1, sets.items), "retrieval": retrieval, "gap": gap["norm"], "gap_vector": gap["gap"]}


def local_measures(loaded: LoadedModel, tasks: list[Task], sets: HeldoutSets, extras: dict | None = None,
                   device: str | torch.device = "cpu", reference_gap: torch.Tensor | None = None) -> Measures:
    """Every number of a table column, measured on `loaded` in this process."""
    accs = {t.name: task_accuracy(loaded, t, extras, device=device) for t in tasks}
    return Measures(tasks=accs, **zero_shot(loaded, sets, device, reference_gap))
