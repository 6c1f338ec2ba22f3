"""Evaluate a model the way every result in gnsp is reported (METHODS.md definitions).

Accuracy uses the known-task label space (MTIL): each dataset is scored over its own class names,
with its own template ensemble (`Task.templates`). MG-CLIP's compensation head joins where it exists for that task.

Every measure runs the model's trunks through `remembered_trunks`: a model whose trunks did not
train since the last measure (gnsp-mini's, under `trainable=auto`) runs only its heads on inputs
it was measured on before (a benchmark's test splits, the held-out suite).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gnsp_core.data.heldout import HeldoutSuite
from gnsp_core.data.samples import Task
from gnsp_core.metrics import embed_pairs, modality_gap, retrieval_recall
from gnsp_core.methods.mgclip_head import compensation_head, compensation_weight
from gnsp_core.models.spec import LoadedModel
from gnsp_core.trunk_memo import remembered_trunks
from gnsp_core.zeroshot import build_text_head, evaluate_accuracy


def task_accuracy(
    loaded: LoadedModel, task: Task, extras: dict[str, torch.Tensor] | None = None,
    templates: Sequence[str] | None = None, device: torch.device | str = "cpu", batch_size: int = 64,
) -> float:
    """Top-1 (percent) on the task's test split over its own labels, with the task's own template
    ensemble unless `templates` is given."""
    model = loaded.model.to(device)
    comp = compensation_head(extras or {}, task.name)
    compensation = None
    if comp is not None:
        comp = comp.to(device)
        compensation = comp.probs
    with remembered_trunks(model):
        head = build_text_head(model, loaded.tokenizer, task.classnames, templates or task.templates, device=device)
        return evaluate_accuracy(model, task.test.with_transform(loaded.preprocess_val), head,
                                 batch_size=batch_size, device=device, compensation=compensation,
                                 compensation_weight=compensation_weight(extras or {}))


def accuracy_row(
    loaded: LoadedModel, tasks: list[Task], extras: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu", batch_size: int = 64,
) -> list[float]:
    return [task_accuracy(loaded, t, extras, device=device, batch_size=batch_size) for t in tasks]


@torch.no_grad()
def class_prompt_gap(loaded: LoadedModel, task: Task, device: torch.device | str = "cpu",
                     reference_gap: torch.Tensor | None = None) -> dict:
    """Modality gap over held-out images paired with their class prompts (the task's first template)."""
    model = loaded.model.to(device).eval()
    loader = torch.utils.data.DataLoader(task.test.with_transform(loaded.preprocess_val), batch_size=64)
    feats, labels = [], []
    with remembered_trunks(model):
        for images, y in loader:
            feats.append(nn.functional.normalize(model.encode_image(images.to(device)).float(), dim=-1))
            labels.append(y)
        tokens = loaded.tokenizer([task.templates[0].format(c) for c in task.classnames]).to(device)
        text = nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
    return modality_gap(torch.cat(feats), text[torch.cat(labels).to(device)], reference_gap)


@torch.no_grad()
def pair_retrieval(loaded: LoadedModel, pairs, device: torch.device | str = "cpu") -> dict[str, float]:
    """Image->text and text->image R@1/R@5 on (image, caption) pairs."""
    with remembered_trunks(loaded.model):
        img, txt, captions = embed_pairs(loaded.model.to(device), loaded.tokenizer,
                                         pairs.with_transform(loaded.preprocess_val), device=device)
    return retrieval_recall(img, txt, captions=captions)


def suite_summary(set_accuracy: dict[str, float], sizes: dict[str, int], recall: dict[str, float]) -> dict:
    """The held-out suite's headline numbers from per-set accuracies and retrieval recall.

    Keys (percent): `heldout_acc` = top-1 pooled over every item of every set (Σ acc·n / Σ n);
    `retrieval_r1`, `retrieval_r5` = mean of image->text and text->image R@k; `heldout_sets` =
    per-set top-1; `retrieval` = the four directional recalls (`i2t_R@1`, ..., `t2i_R@5`).
    """
    total = sum(sizes[name] for name in set_accuracy)
    return {
        "heldout_acc": sum(acc * sizes[name] for name, acc in set_accuracy.items()) / total,
        "retrieval_r1": (recall["i2t_R@1"] + recall["t2i_R@1"]) / 2,
        "retrieval_r5": (recall["i2t_R@5"] + recall["t2i_R@5"]) / 2,
        "heldout_sets": dict(set_accuracy),
        "retrieval": dict(recall),
    }


def heldout_metrics(loaded: LoadedModel, suite: HeldoutSuite, device: torch.device | str = "cpu",
                    batch_size: int = 64) -> dict:
    """Zero-shot accuracy on every set of the held-out suite and retrieval on its pairs (`suite_summary`)."""
    with remembered_trunks(loaded.model):
        return _heldout_metrics(loaded, suite, device, batch_size)


def _heldout_metrics(loaded: LoadedModel, suite: HeldoutSuite, device: torch.device | str, batch_size: int) -> dict:
    img, txt, captions = embed_pairs(loaded.model.to(device), loaded.tokenizer,
                                     suite.pairs.with_transform(loaded.preprocess_val), batch_size, device)
    accs = {}
    for name, (start, stop, prefix) in suite.pair_sets.items():
        if not all(c.startswith(prefix) for c in captions[start:stop]):
            raise ValueError(f"{name}: every caption must start with {prefix!r}")
        sims = img[start:stop] @ txt[start:stop].T  # = cosine with the set's zero-shot head
        accs[name] = 100.0 * (sims.argmax(1) == torch.arange(stop - start)).float().mean().item()
    for task in suite.photo_tasks:
        accs[task.name] = task_accuracy(loaded, task, device=device, batch_size=batch_size)
    return suite_summary(accs, suite.sizes, retrieval_recall(img, txt, captions=captions))
