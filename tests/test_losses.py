import math

import pytest
import torch
import torch.nn.functional as F

from gnsp_core.losses import (
    ContrastiveDistillation,
    FeatureDistillation,
    ModalityAlignmentPreservation,
    kd_loss,
    soft_caption_targets,
    task_cross_entropy,
)


def randn(*shape, seed=0, grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def test_task_cross_entropy_normalises_features():
    img, txt, labels = randn(6, 8), randn(3, 8, seed=1), torch.tensor([0, 1, 2, 0, 1, 2])
    logits = 100.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    expected = F.cross_entropy(logits, labels, label_smoothing=0.2)
    torch.testing.assert_close(task_cross_entropy(3 * img, 0.5 * txt, labels, label_smoothing=0.2), expected)


def test_kd_zero_for_equal_logits_and_positive_otherwise():
    t = randn(5, 7)
    assert kd_loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(t, randn(5, 7, seed=1)).item() > 0


def test_kd_by_hand():
    teacher, student = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    q = torch.tensor([1.0, 0.0]).softmax(dim=0)  # student / T with T = 2
    expected = 4 * (0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1]))
    assert kd_loss(teacher, student, T=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_kd_gradient_equals_published_soft_target_cross_entropy():
    teacher = randn(4, 6)
    a, b = randn(4, 6, seed=1, grad=True), randn(4, 6, seed=1, grad=True)
    kd_loss(teacher, a, T=2.0).backward()
    published = F.cross_entropy(b / 2.0, F.softmax(teacher / 2.0, dim=1)) * 4.0  # GNSP/ZSCL helpers.distillation
    published.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_contrastive_distillation_symmetric_zero_and_differentiable():
    cd = ContrastiveDistillation(T=2.0)
    img, txt = randn(5, 8, grad=True), randn(5, 8, seed=1, grad=True)
    img0, txt0 = randn(5, 8, seed=2), randn(5, 8, seed=3)
    loss = cd(img, txt, img0, txt0)
    torch.testing.assert_close(loss, cd(txt, img, txt0, img0))  # swapping the modalities
    assert cd(img, txt, img.detach(), txt.detach()).item() == pytest.approx(0.0, abs=1e-5)
    z = 100 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    z0 = 100 * F.normalize(img0, dim=-1) @ F.normalize(txt0, dim=-1).T
    torch.testing.assert_close(loss, kd_loss(z0, z) + kd_loss(z0.T, z.T))
    loss.backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0


def test_soft_caption_targets_spread_over_repeats():
    expected = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    torch.testing.assert_close(soft_caption_targets(["a", "b", "a"]), expected)


def test_map_equals_soft_target_formula_by_hand():
    img, txt = randn(3, 8, grad=True), randn(3, 8, seed=1)
    captions = ["a photo of a cat", "a photo of a dog", "a photo of a cat"]
    z = 100 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    y = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    y_smooth = 0.8 * y + 0.2 / 3
    by_hand = -(y_smooth * z.log_softmax(dim=1)).sum(1).mean() - (y_smooth * z.T.log_softmax(dim=1)).sum(1).mean()
    map_loss = ModalityAlignmentPreservation(label_smoothing=0.2)
    loss = map_loss(img, txt, captions)
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(map_loss(img, txt, torch.tensor([4, 9, 4])), by_hand)
    loss.backward()
    assert img.grad.abs().sum() > 0


def test_map_without_repeats_is_clip_loss():
    img, txt = randn(4, 8), randn(4, 8, seed=1)
    z = 100 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    labels = torch.arange(4)
    expected = F.cross_entropy(z, labels) + F.cross_entropy(z.T, labels)
    loss = ModalityAlignmentPreservation(label_smoothing=0.0)(img, txt, ["a", "b", "c", "d"])
    torch.testing.assert_close(loss, expected)


def test_feature_distillation():
    fd = FeatureDistillation(kd_weight=0.0)
    img, txt = randn(4, 8, grad=True), randn(4, 8, seed=1)
    img0 = randn(4, 8, seed=2)
    expected = (F.normalize(img, dim=-1) - F.normalize(img0, dim=-1)).pow(2).sum(1).mean()
    loss = fd(img, txt, img0, txt)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert img.grad.abs().sum() > 0
    assert FeatureDistillation()(img, txt, img.detach(), txt).item() == pytest.approx(0.0, abs=1e-5)
