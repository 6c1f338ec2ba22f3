import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from gnsp_core.errors import DatasetError
from gnsp_core.models import ModelSpec, load_model
from gnsp_core.zeroshot import (
    TEMPLATES,
    TextHeadCache,
    build_text_head,
    evaluate_accuracy,
    predict,
)

CLASSES = ["cat", "dog", "bird", "fish", "horse"]


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelSpec(name="tiny"))


@pytest.fixture(scope="module")
def images():
    return torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_templates_start_with_training_template():
    assert TEMPLATES[0] == "a photo of a {}."
    assert all("{}" in t for t in TEMPLATES)


def test_head_is_mean_of_normalised_template_embeddings(tiny):
    templates = TEMPLATES[:3]
    head = build_text_head(tiny.model, tiny.tokenizer, CLASSES, templates, batch_size=2)
    with torch.no_grad():
        embed = [tiny.model.encode_text(tiny.tokenizer([t.format(c) for c in CLASSES])) for t in templates]
    per_template = F.normalize(torch.stack(embed), dim=-1)
    expected = F.normalize(per_template.mean(dim=0), dim=-1)
    assert head.shape == (len(CLASSES), 64)
    torch.testing.assert_close(head, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(len(CLASSES)))


def test_head_does_not_depend_on_batch_size_and_restores_mode(tiny):
    tiny.model.train()
    small = build_text_head(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES, batch_size=1)
    large = build_text_head(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES, batch_size=256)
    assert tiny.model.training
    tiny.model.eval()
    assert not small.requires_grad
    torch.testing.assert_close(small, large, atol=1e-5, rtol=1e-5)


def test_unnormalised_head_is_raw_mean(tiny):
    head = build_text_head(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES[:2], normalize=False)
    with torch.no_grad():
        raw = [tiny.model.encode_text(tiny.tokenizer([t.format(c) for c in CLASSES])) for t in TEMPLATES[:2]]
    torch.testing.assert_close(head, (raw[0] + raw[1]) / 2, atol=1e-5, rtol=1e-5)


def test_head_rejects_empty_inputs(tiny):
    with pytest.raises(ValueError):
        build_text_head(tiny.model, tiny.tokenizer, [], TEMPLATES)


def test_cache_hits_misses_and_lru_eviction(tiny):
    cache = TextHeadCache(maxsize=2)
    a = cache.get(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES[:1], key="v1")
    assert cache.get(tiny.model, tiny.tokenizer, list(CLASSES), TEMPLATES[:1], key="v1") is a
    b = cache.get(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES[:1], key="v2")
    assert b is not a and len(cache) == 2
    cache.get(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES[:1], key="v1")  # v1 most recent
    cache.get(tiny.model, tiny.tokenizer, CLASSES[:2], TEMPLATES[:1], key="v1")  # evicts v2
    assert len(cache) == 2
    assert cache.get(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES[:1], key="v1") is a
    assert cache.get(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES[:1], key="v2") is not b
    cache.clear()
    assert len(cache) == 0


def test_predict_is_softmax_of_scaled_cosines(tiny, images):
    head = build_text_head(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES[:2])
    probs = predict(tiny.model, images, head, logit_scale=50.0)
    with torch.no_grad():
        feats = F.normalize(tiny.model.encode_image(images), dim=-1)
    torch.testing.assert_close(probs, (50.0 * feats @ head.T).softmax(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(len(images)))


def test_evaluate_accuracy_exact(tiny, images):
    head = build_text_head(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES[:2])
    predicted = predict(tiny.model, images, head).argmax(dim=-1)
    right = TensorDataset(images, predicted)
    wrong = TensorDataset(images, (predicted + 1) % len(CLASSES))
    assert evaluate_accuracy(tiny.model, right, head, batch_size=5) == 100.0
    assert evaluate_accuracy(tiny.model, wrong, head, batch_size=5) == 0.0


def test_evaluate_accuracy_with_compensation(tiny, images):
    head = build_text_head(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES[:2])
    labels = torch.arange(len(images)) % len(CLASSES)

    def always_class_zero(features):
        return F.one_hot(torch.zeros(len(features), dtype=torch.long), len(CLASSES)).float()

    # weight 4: the one-hot contributes 0.8 to class 0, text probabilities at most 0.2 elsewhere
    acc = evaluate_accuracy(tiny.model, TensorDataset(images, labels), head, compensation=always_class_zero)
    assert acc == pytest.approx(100.0 * (labels == 0).float().mean().item())


def test_evaluate_accuracy_rejects_empty_dataset(tiny):
    head = build_text_head(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES[:1])
    empty = TensorDataset(torch.zeros(0, 3, 64, 64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DatasetError):
        evaluate_accuracy(tiny.model, empty, head)
