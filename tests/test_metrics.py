import math

import pytest
import torch
import torch.nn.functional as F

from gnsp_core.metrics import (
    METRIC_FORMULAS,
    embed_pairs,
    gap_vector,
    modality_gap,
    mtil_metrics,
    retrieval_recall,
    same_caption_matrix,
)
from gnsp_core.models import ModelSpec, load_model

# 3 tasks + 1 held-out eval set; row 0 = zero-shot, row i = after task i
ACC = [
    [50.0, 40.0, 30.0, 60.0],
    [80.0, 45.0, 35.0, 58.0],
    [70.0, 90.0, 33.0, 55.0],
    [65.0, 85.0, 95.0, 50.0],
]


def test_mtil_metrics_by_hand():
    m = mtil_metrics(ACC, num_tasks=3)
    # Transfer: j=2 -> A[1][2] = 45; j=3 -> (A[1][3] + A[2][3]) / 2 = (35 + 33) / 2 = 34
    assert m["transfer"] == pytest.approx((45 + 34) / 2)
    # Avg: rows 1..3, all 4 columns (tasks and eval set): (218 + 248 + 295) / 12
    assert m["avg"] == pytest.approx(761 / 12)
    # Last: row 3, all columns
    assert m["last"] == pytest.approx(295 / 4)
    # BWT: (65 - 80) and (85 - 90)
    assert m["bwt"] == pytest.approx(-10.0)
    # FWT: A[1][2] - A[0][2] = 5, A[2][3] - A[0][3] = 3
    assert m["fwt"] == pytest.approx(4.0)
    assert set(m) == set(METRIC_FORMULAS)


def test_mtil_metrics_square_matrix_is_zscl_avg():
    acc = [[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]]
    m = mtil_metrics(acc, num_tasks=2)
    assert m["avg"] == pytest.approx((30 + 40 + 50 + 60) / 4)
    assert m["transfer"] == pytest.approx(40.0)
    assert m["last"] == pytest.approx(55.0)
    assert m["bwt"] == pytest.approx(20.0)
    assert m["fwt"] == pytest.approx(20.0)


def test_mtil_metrics_single_task_has_no_pairwise_metrics():
    m = mtil_metrics([[50.0, 60.0], [80.0, 58.0]], num_tasks=1)
    assert m["transfer"] is None and m["bwt"] is None and m["fwt"] is None
    assert m["avg"] == pytest.approx(69.0) and m["last"] == pytest.approx(69.0)


@pytest.mark.parametrize(
    "acc,tasks",
    [(ACC[:3], 3), ([[1.0], [2.0], [3.0]], 2), ([[1.0, 2.0], [1.0]], 1), (ACC, 0)],
)
def test_mtil_metrics_rejects_bad_shapes(acc, tasks):
    with pytest.raises(ValueError):
        mtil_metrics(acc, num_tasks=tasks)


def test_modality_gap_on_constructed_vectors():
    images = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    texts = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 1.0]])
    # normalised means: [0.5, 0.5, 0] and [0, 0, 1]
    gap = modality_gap(images, texts)
    torch.testing.assert_close(gap["gap"], torch.tensor([0.5, 0.5, -1.0]))
    assert gap["norm"] == pytest.approx(math.sqrt(1.5))
    assert gap["cosine"] is None
    assert modality_gap(images, texts, torch.tensor([1.0, 1.0, -2.0]))["cosine"] == pytest.approx(1.0)
    assert modality_gap(images, texts, torch.tensor([-0.5, -0.5, 1.0]))["cosine"] == pytest.approx(-1.0)
    assert modality_gap(images, texts, torch.tensor([1.0, -1.0, 0.0]))["cosine"] == pytest.approx(0.0, abs=1e-7)


def test_gap_vector_is_differentiable():
    images = torch.randn(4, 8, requires_grad=True)
    gap_vector(images, torch.randn(4, 8)).norm().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_retrieval_recall_known_values():
    images = torch.eye(4)
    texts = torch.eye(4)[[0, 1, 3, 2]]  # captions of pairs 2 and 3 swapped
    r = retrieval_recall(images, texts, ks=(1, 5))
    assert r == {"i2t_R@1": 50.0, "t2i_R@1": 50.0, "i2t_R@5": 100.0, "t2i_R@5": 100.0}
    # identical captions for pairs 2 and 3: either one is a correct answer
    r = retrieval_recall(images, texts, ks=(1,), captions=["a", "b", "c", "c"])
    assert r == {"i2t_R@1": 100.0, "t2i_R@1": 100.0}


def test_retrieval_recall_at_two():
    images = torch.eye(3)
    # text 0 is closest to image 1, then image 0; texts 1 and 2 are exact
    texts = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = retrieval_recall(images, texts, ks=(1, 2))
    assert r["t2i_R@1"] == pytest.approx(200 / 3)
    assert r["t2i_R@2"] == pytest.approx(100.0)
    assert r["i2t_R@1"] == pytest.approx(100.0)  # image 0's best text is still text 0 (0.6 > 0)


def test_same_caption_matrix_from_strings_and_ids():
    expected = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    assert torch.equal(same_caption_matrix(["x", "y", "x"]), expected)
    assert torch.equal(same_caption_matrix(torch.tensor([7, 3, 7])), expected)


def test_embed_pairs_on_tiny_model():
    lm = load_model(ModelSpec(name="tiny"))
    gen = torch.Generator().manual_seed(0)
    captions = ["a photo of a cat", "a photo of a dog", "a photo of a cat"]
    pairs = [(torch.randn(3, 64, 64, generator=gen), c) for c in captions]
    img, txt, caps = embed_pairs(lm.model, lm.tokenizer, pairs, batch_size=2)
    assert img.shape == (3, 64) and txt.shape == (3, 64) and caps == captions
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt[0], txt[2])
    with torch.no_grad():
        expected = F.normalize(lm.model.encode_text(lm.tokenizer(captions)), dim=-1)
    torch.testing.assert_close(txt, expected, atol=1e-5, rtol=1e-5)
