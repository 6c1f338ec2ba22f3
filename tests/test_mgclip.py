"""MG-CLIP's pieces: the gap signal and early stop (training) and the compensation head (evaluation)."""

import math

import pytest
import torch
import torch.nn.functional as F

from gnsp_core.methods.mgclip import GapMonitor, mean_negative_logit
from gnsp_core.methods.mgclip_head import CosineCompensationHead, combine_mgclip


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
