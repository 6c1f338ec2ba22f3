import math

import pytest
import torch
import torch.nn.functional as F

from gnsp_core.losses import (
    ContrastiveDistillation,
    CosineCompensationHead,
    FeatureDistillation,
    GapMonitor,
    GapPreservationLoss,
    ModalityAlignmentPreservation,
    combine_mgclip,
    kd_loss,
    mean_negative_logit,
    soft_caption_targets,
    task_cross_entropy,
)
from gnsp_core.metrics import gap_vector


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


def test_gap_preservation_loss_zero_at_reference_and_pulls_back():
    img, txt = randn(6, 8) + 1.0, randn(6, 8, seed=1) - 1.0
    loss_fn = GapPreservationLoss(gap_vector(img, txt))
    assert loss_fn(img, txt).item() == pytest.approx(0.0, abs=1e-6)
    moved = (img + randn(6, 8, seed=2)).requires_grad_(True)
    loss = loss_fn(moved, txt)
    assert loss.item() > 0
    loss.backward()
    assert moved.grad.abs().sum() > 0


def test_mean_negative_logit_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # image 0 (label 0): negatives cos 0 and 1/√2; image 1 (label 2): negatives cos 0 and 1
    expected = (100 * (0 + 1 / math.sqrt(2)) / 2 + 100 * (0 + 1) / 2) / 2
    assert mean_negative_logit(img, txt, torch.tensor([0, 2])) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        mean_negative_logit(img, txt[:1], torch.tensor([0, 0]))


def test_gap_monitor_stops_at_first_move_beyond_alpha():
    monitor = GapMonitor(alpha=0.10)
    with pytest.raises(RuntimeError):
        monitor.should_stop(1.0)
    monitor.record_baseline(20.0)
    per_epoch = [20.5, 21.9, 22.0, 22.1, 25.0]  # 22.0 is exactly 10 %: not beyond
    stops = [monitor.should_stop(v) for v in per_epoch]
    assert stops == [False, False, False, True, True]
    assert stops.index(True) + 1 == 4  # the epoch count reused for later tasks
    assert monitor.should_stop(17.9)  # moving down counts too


def _clustered(num_classes=3, per_class=20, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=gen), labels


def test_compensation_head_init_is_class_mean_of_normalised_features():
    features, labels = _clustered()
    head = CosineCompensationHead(dim=8)
    assert head.add_classes(features, labels) == 0
    means = torch.stack([F.normalize(features[labels == c], dim=-1).mean(0) for c in range(3)])
    torch.testing.assert_close(head.weight.detach(), means)
    assert head.add_classes(features[:40], labels[:40]) == 3 and head.num_classes == 5


def test_compensation_head_fit_trains_only_current_rows():
    features, labels = _clustered()
    head = CosineCompensationHead(dim=8)
    head.add_classes(features, labels)
    new_features, new_labels = _clustered(num_classes=2, seed=1)
    first = head.add_classes(new_features, new_labels)
    old_rows = head.weight.detach()[:first].clone()
    before = F.cross_entropy(head(new_features)[:, first:], new_labels).item()
    after = head.fit(new_features, new_labels, first_class=first, epochs=20, lr=1e-2, batch_size=16)
    assert after < before
    torch.testing.assert_close(head.weight.detach()[:first], old_rows)


def test_compensation_head_probs_and_state_dict_round_trip():
    features, labels = _clustered()
    head = CosineCompensationHead(dim=8)
    head.add_classes(features, labels)
    probs = head.probs(features)
    cos = F.normalize(features, dim=-1) @ F.normalize(head.weight.detach(), dim=-1).T
    torch.testing.assert_close(probs, cos.softmax(dim=-1))
    restored = CosineCompensationHead(dim=8)
    restored.load_state_dict(head.state_dict())
    torch.testing.assert_close(restored.probs(features), probs)


def test_combine_mgclip_formula():
    text, comp = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.4, 0.6]])
    torch.testing.assert_close(combine_mgclip(text, comp), torch.tensor([[(0.9 + 1.6) / 5, (0.1 + 2.4) / 5]]))
    torch.testing.assert_close(combine_mgclip(text, comp, weight=1.0), torch.tensor([[0.65, 0.35]]))
