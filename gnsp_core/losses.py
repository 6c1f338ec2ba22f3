"""Losses of the methods gnsp implements: task cross-entropy, distillation, alignment preservation.

Feature arguments are raw embeddings; every loss L2-normalises them itself, so callers can pass
`model.encode_image(x)` directly. Logits are `logit_scale · cos` with CLIP's fixed scale 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from gnsp_core.metrics import same_caption_matrix


def cosine_logits(a: Tensor, b: Tensor, logit_scale: float) -> Tensor:
    """logit_scale · cos(a_i, b_j) for every pair: the logits every CLIP loss starts from."""
    return logit_scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def task_cross_entropy(
    image_features: Tensor,
    class_text_features: Tensor,
    labels: Tensor,
    logit_scale: float = 100.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Zero-shot-style task loss: CE(logit_scale · f̂(x) · ĝ(prompt_c)ᵀ, y) over the task's classes."""
    logits = cosine_logits(image_features, class_text_features, logit_scale)
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
        z = cosine_logits(img_feats, txt_feats, self.logit_scale)
        z0 = cosine_logits(img_feats0, txt_feats0, self.logit_scale)
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
        z = cosine_logits(img_feats, txt_feats, self.logit_scale)
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
        z = cosine_logits(img_feats, txt_feats, self.logit_scale)
        z0 = cosine_logits(img_feats0, txt_feats0, self.logit_scale)
        return self.feature_weight * feature_term + self.kd_weight * kd_loss(z0, z, self.T)
