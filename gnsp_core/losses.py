"""Losses of the methods gnsp implements, and the MG-CLIP pieces (gap monitor, compensation head).

Feature arguments are raw embeddings; every loss L2-normalises them itself, so callers can pass
`model.encode_image(x)` directly. Logits are `logit_scale · cos` with CLIP's fixed scale 100.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import gap_vector, same_caption_matrix


def _cosine_logits(a: Tensor, b: Tensor, logit_scale: float) -> Tensor:
    return logit_scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def task_cross_entropy(
    image_features: Tensor,
    class_text_features: Tensor,
    labels: Tensor,
    logit_scale: float = 100.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Zero-shot-style task loss: CE(logit_scale · f̂(x) · ĝ(prompt_c)ᵀ, y) over the task's classes."""
    logits = _cosine_logits(image_features, class_text_features, logit_scale)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def kd_loss(teacher_logits: Tensor, student_logits: Tensor, T: float = 2.0) -> Tensor:
    """Knowledge distillation: T² · mean over rows of KL(softmax(teacher/T) ‖ softmax(student/T)).

    The published GNSP/ZSCL code uses the soft-target cross-entropy −Σ p log q instead; the two
    differ by the teacher's entropy, a constant for the student, so gradients are identical. The
    KL form reads better in logs: 0 exactly when the student matches the teacher. The teacher is a
    target and is detached.
    """
    log_p = F.log_softmax(teacher_logits.detach() / T, dim=-1)
    log_q = F.log_softmax(student_logits / T, dim=-1)
    return T**2 * (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


class ContrastiveDistillation(nn.Module):
    """GNSP's CD on a reference batch: L = KD(Z₀, Z) + KD(Z₀ᵀ, Zᵀ).

    Z = logit_scale · Î Tᵀ from the current model, Z₀ the same from the frozen initial model, both
    over the batch's images and captions: rows distil image→text, columns text→image similarities.
    """

    def __init__(self, T: float = 2.0, logit_scale: float = 100.0) -> None:
        super().__init__()
        self.T = T
        self.logit_scale = logit_scale

    def forward(self, img_feats: Tensor, txt_feats: Tensor, img_feats0: Tensor, txt_feats0: Tensor) -> Tensor:
        z = _cosine_logits(img_feats, txt_feats, self.logit_scale)
        z0 = _cosine_logits(img_feats0, txt_feats0, self.logit_scale)
        return kd_loss(z0, z, self.T) + kd_loss(z0.T, z.T, self.T)


def soft_caption_targets(captions: Sequence[str] | Tensor) -> Tensor:
    """Y[i][j] = [caption_i = caption_j] / #{k : caption_k = caption_i}: repeated captions share the mass."""
    same = same_caption_matrix(captions).float()
    return same / same.sum(dim=1, keepdim=True)


class ModalityAlignmentPreservation(nn.Module):
    """GNSP's MAP: CLIP's symmetric contrastive loss on the reference batch, current model only.

    L = CE(Z, Y) + CE(Zᵀ, Y), Z = logit_scale · Î Tᵀ, Y = soft_caption_targets (symmetric), each CE
    with label smoothing ε: targets (1 − ε)·Y + ε/N. The two directions are summed, not averaged,
    as in the official code (its weight 0.75 was tuned for the sum).
    """

    def __init__(self, label_smoothing: float = 0.2, logit_scale: float = 100.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.logit_scale = logit_scale

    def forward(self, img_feats: Tensor, txt_feats: Tensor, captions: Sequence[str] | Tensor) -> Tensor:
        z = _cosine_logits(img_feats, txt_feats, self.logit_scale)
        targets = soft_caption_targets(captions).to(z)
        image_to_text = F.cross_entropy(z, targets, label_smoothing=self.label_smoothing)
        text_to_image = F.cross_entropy(z.T, targets, label_smoothing=self.label_smoothing)
        return image_to_text + text_to_image


class FeatureDistillation(nn.Module):
    """ZSCL-style distillation from the pre-trained model on a reference batch.

    L = feature_weight · mean_i ‖Î_i − Î₀_i‖² + kd_weight · KD(Z₀, Z), with Î, Î₀ the current and
    pre-trained normalised image features and Z = logit_scale · Î Tᵀ the image→text logits
    (Z₀ from the pre-trained model's image and text features).
    """

    def __init__(
        self, T: float = 2.0, logit_scale: float = 100.0, feature_weight: float = 1.0, kd_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.T = T
        self.logit_scale = logit_scale
        self.feature_weight = feature_weight
        self.kd_weight = kd_weight

    def forward(self, img_feats: Tensor, txt_feats: Tensor, img_feats0: Tensor, txt_feats0: Tensor) -> Tensor:
        diff = F.normalize(img_feats, dim=-1) - F.normalize(img_feats0.detach(), dim=-1)
        feature_term = diff.pow(2).sum(dim=-1).mean()
        z = _cosine_logits(img_feats, txt_feats, self.logit_scale)
        z0 = _cosine_logits(img_feats0, txt_feats0, self.logit_scale)
        return self.feature_weight * feature_term + self.kd_weight * kd_loss(z0, z, self.T)


class GapPreservationLoss(nn.Module):
    """Keep the modality gap near the pre-trained model's. Our optional addition, NOT MG-CLIP's.

    MG-CLIP preserves the gap only by early stopping (`GapMonitor`). This explicit loss, on a batch
    of matched pairs with Δ = gap_vector(images, texts) and Δ₀ the pre-trained gap:
    L = norm_weight · (‖Δ‖ − ‖Δ₀‖)² + direction_weight · (1 − cos(Δ, Δ₀)).
    """

    def __init__(self, reference_gap: Tensor, norm_weight: float = 1.0, direction_weight: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("reference_gap", reference_gap.detach().clone().float())
        self.norm_weight = norm_weight
        self.direction_weight = direction_weight

    def forward(self, img_feats: Tensor, txt_feats: Tensor) -> Tensor:
        gap = gap_vector(img_feats, txt_feats)
        ref = self.reference_gap.to(gap)
        norm_term = (gap.norm() - ref.norm()).pow(2)
        direction_term = 1.0 - F.cosine_similarity(gap, ref, dim=0)
        return self.norm_weight * norm_term + self.direction_weight * direction_term


# --- MG-CLIP (Mind the Gap, official code linlany/MindtheGap) --------------------------------


def mean_negative_logit(
    image_features: Tensor, class_text_features: Tensor, labels: Tensor, logit_scale: float = 100.0
) -> float:
    """MG-CLIP's gap signal: mean over images of the mean logit_scale · cos to the OTHER classes' prompts."""
    logits = _cosine_logits(image_features.detach(), class_text_features.detach(), logit_scale)
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError("the mean negative logit needs at least two classes")
    negatives = torch.ones_like(logits, dtype=torch.bool)
    negatives[torch.arange(len(labels)), labels.to(logits.device)] = False
    return (logits * negatives).sum(dim=1).div(num_classes - 1).mean().item()


class GapMonitor:
    """MG-CLIP's adaptive early stop: stop once the mean negative logit moved by more than alpha.

    Record the value before training on the first task (`record_baseline`), then ask
    `should_stop(value)` after each epoch (in MTIL: every N iterations). Stop when
    |value − baseline| / |baseline| > alpha; the caller reuses that epoch count for later tasks.
    """

    def __init__(self, alpha: float = 0.10, baseline: float | None = None) -> None:
        self.alpha = alpha
        self.baseline = baseline

    def record_baseline(self, value: float) -> None:
        self.baseline = float(value)

    def relative_change(self, value: float) -> float:
        if self.baseline is None:
            raise RuntimeError("GapMonitor has no baseline: call record_baseline() before training")
        if self.baseline == 0.0:
            return 0.0 if value == 0.0 else math.inf
        return abs(value - self.baseline) / abs(self.baseline)

    def should_stop(self, value: float) -> bool:
        return self.relative_change(value) > self.alpha


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


def combine_mgclip(text_probs: Tensor, comp_probs: Tensor, weight: float = 4.0) -> Tensor:
    """MG-CLIP's prediction: (softmax text probs + weight · compensation probs) / (1 + weight)."""
    return (text_probs + weight * comp_probs.to(text_probs)) / (1.0 + weight)
