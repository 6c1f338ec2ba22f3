"""MG-CLIP's gap compensation head: fitted after each task, combined with the zero-shot head when
evaluating. Its own module because evaluation needs it and must not import the training stack."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COMPENSATION_WEIGHT_KEY = "mgclip.compensation_weight"
PUBLISHED_COMPENSATION_WEIGHT = 4.0


class CosineCompensationHead(nn.Module):
    """MG-CLIP's gap compensation: a cosine classifier in the image-embedding space, CLIP frozen.

    One row w_c per class; logits cos(x, w_c) (both normalised). Rows are appended per task by
    `add_classes`, initialised at the class mean of the normalised image embeddings, then `fit`
    trains with cross-entropy over the current task's rows only (old rows get no gradient).
    As in the official code the training logits are the raw cosines (`scale` = 1; Adam, lr 5e-4,
    batch 64, 3 epochs, cosine decay to lr/100), and `probs` = softmax(cos(x, w_c)) is deliberately
    flat: `combine_mgclip` gives it weight 4 against CLIP's sharp text probabilities.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(0, dim))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        """Cosine logits [N, C]."""
        return F.normalize(features.to(self.weight), dim=-1) @ F.normalize(self.weight, dim=-1).T

    def probs(self, features: Tensor) -> Tensor:
        return self(features).softmax(dim=-1)

    def add_classes(self, features: Tensor, labels: Tensor) -> int:
        """Append one row per new class 0..K−1 of `labels` (task-local), at its mean normalised feature.

        Returns the index of the first new row, the `first_class` to pass to `fit`.
        """
        features = F.normalize(features.detach().to(self.weight), dim=-1)
        labels = labels.to(features.device)
        k = int(labels.max().item()) + 1
        counts = torch.bincount(labels, minlength=k).clamp_min(1).unsqueeze(1).to(features)
        means = torch.zeros(k, features.shape[1], dtype=features.dtype, device=features.device)
        means = means.index_add_(0, labels, features) / counts
        first = self.num_classes
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), means]))
        return first

    def fit(
        self,
        features: Tensor,
        labels: Tensor,
        *,
        first_class: int = 0,
        epochs: int = 3,
        lr: float = 5e-4,
        batch_size: int = 64,
        scale: float = 1.0,
        seed: int = 0,
    ) -> float:
        """Train on precomputed image features with CE(scale · cos(x, w)[:, first_class:], task-local labels).

        Returns the mean loss of the last epoch.
        """
        features, labels = features.detach().to(self.weight), labels.to(self.weight.device)
        steps = epochs * math.ceil(len(labels) / batch_size)
        optimizer = torch.optim.Adam([self.weight], lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1), eta_min=lr * 0.01)
        generator = torch.Generator().manual_seed(seed)
        epoch_losses: list[float] = []
        for _ in range(epochs):
            epoch_losses = []
            for idx in torch.randperm(len(labels), generator=generator).split(batch_size):
                idx = idx.to(labels.device)
                loss = F.cross_entropy(scale * self(features[idx])[:, first_class:], labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                epoch_losses.append(loss.item())
        return sum(epoch_losses) / max(len(epoch_losses), 1)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # the number of rows grows per task: take the saved shape before loading
        saved = state_dict.get(prefix + "weight")
        if saved is not None:
            self.weight = nn.Parameter(torch.empty_like(saved, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def combine_mgclip(text_probs: Tensor, comp_probs: Tensor, weight: float = PUBLISHED_COMPENSATION_WEIGHT) -> Tensor:
    """MG-CLIP's prediction: (softmax text probs + weight · compensation probs) / (1 + weight)."""
    return (text_probs + weight * comp_probs.to(text_probs)) / (1.0 + weight)


def compensation_head(extras: dict[str, torch.Tensor], task_name: str) -> CosineCompensationHead | None:
    """The compensation classifier fitted after `task_name`, if MG-CLIP learned it."""
    weight = extras.get(f"mgclip.comp.{task_name}")
    if weight is None:
        return None
    head = CosineCompensationHead(weight.shape[1])
    head.weight = nn.Parameter(weight.clone(), requires_grad=False)
    return head


def compensation_weight(extras: dict[str, torch.Tensor]) -> float:
    """The weight w of the compensation probabilities that MG-CLIP was trained with (its
    `compensation_weight` setting, kept in the state), else the paper's 4."""
    weight = extras.get(COMPENSATION_WEIGHT_KEY)
    return PUBLISHED_COMPENSATION_WEIGHT if weight is None else float(weight)
