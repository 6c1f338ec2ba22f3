"""The search objective: one number for the stability-plasticity trade-off, on validation data only.

After task t of the sequence (t = 1..T) a trial reports

    seen_acc   mean validation top-1 (percent) over tasks 1..t, on the current model: MTIL's "Last",
               restricted to the tasks learned so far, on the validation parts of their TRAIN splits
    retention  min(1, R@1_now / R@1_pre-trained), R@1 = mean of image->text and text->image Recall@1
               among the 128 validation reference pairs that CD/MAP never train on (service.tuning.data)
    objective  harmonic mean of seen_acc / 100 and retention, in [0, 1]

Why this objective:
- seen_acc, not new-task accuracy: the null-space threshold ρ trades learning the new task against
  disturbing the earlier ones. New-task accuracy alone rewards a large ρ (little protection);
  averaging over every task learned so far scores both sides, plasticity on the newest task and
  stability on the others.
- retention measures the other thing the user asked to keep, zero-shot ability, on data no trial
  fits. It is relative to the pre-trained model so it means the same on any model. It is capped
  at 1 because the aim is to keep that ability: an uncapped ratio would let a trial pay for lost
  task accuracy with retrieval gains on the reference domain.
- harmonic, not arithmetic mean: it is at most twice the weaker term, so a trial that loses its
  zero-shot ability (retention -> 0) or learns nothing cannot hide behind the other term.
- not MTIL Avg/Transfer on validation: they need every task scored after every task (T^2
  evaluations instead of T(T+1)/2) and mostly add zero-shot accuracy on tasks not learned yet,
  which the threshold barely affects and retention already covers.
- reported after every task, so ASHA compares trials at the same point of the sequence
  (rung t = t tasks learned) and stops the weak ones early.
The table also shows `new_acc` (the newest task) and `forgetting` (mean drop of each earlier
task's validation accuracy since right after it was learned, i.e. -BWT on validation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import fmean

import torch

from gnsp_core.data import Task
from gnsp_core.evaluation import pair_retrieval, task_accuracy
from gnsp_core.models import LoadedModel
from gnsp_core.state import ContinualState

OBJECTIVE = "objective"
"""The metric the searcher and the scheduler maximise."""


@dataclass(frozen=True)
class TrialScore:
    """Validation metrics of one trial after some number of tasks."""

    seen_acc: float
    new_acc: float
    forgetting: float
    retrieval_r1: float
    retention: float
    objective: float

    def as_metrics(self) -> dict[str, float]:
        return asdict(self)


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


def retrieval_r1(loaded: LoadedModel, pairs, device: torch.device | str = "cpu") -> float:
    """Mean of image->text and text->image R@1 (percent) on (image, caption) pairs."""
    recall = pair_retrieval(loaded, pairs, device=device)
    return (recall["i2t_R@1"] + recall["t2i_R@1"]) / 2


def score(accs: list[float], learned_accs: list[float], r1: float, baseline_r1: float) -> TrialScore:
    """The objective from accuracies now (tasks 1..t), accuracies right after learning tasks 1..t-1,
    and reference R@1 now and before any task."""
    earlier = [before - now for before, now in zip(learned_accs, accs[:-1])]
    retention = 1.0 if baseline_r1 <= 0 else min(1.0, r1 / baseline_r1)
    seen = fmean(accs)
    return TrialScore(seen_acc=seen, new_acc=accs[-1], forgetting=fmean(earlier) if earlier else 0.0,
                      retrieval_r1=r1, retention=retention, objective=harmonic_mean(seen / 100, retention))


def evaluate_state(
    loaded: LoadedModel, state: ContinualState, tasks: list[Task], pairs, device: torch.device | str = "cpu",
) -> tuple[list[float], float]:
    """Validation accuracy on each task (its `test` split holds the validation part) and reference R@1."""
    loaded.model.load_state_dict(state.weights)
    accs = [task_accuracy(loaded, task, state.extras, device=device) for task in tasks]
    return accs, retrieval_r1(loaded, pairs, device)
