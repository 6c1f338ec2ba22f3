"""A served version answers a batch of requests as it would answer each alone, pool or not."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from gnsp_core.zeroshot import TextHeadCache
from service.serving.served_model import ServedModel
from service_support import png_bytes


def scores(answers: list[dict]) -> list[list[float]]:
    return [[p for result in answer["results"] for p in result["scores"].values()] for answer in answers]


def test_a_batch_answers_each_request_as_alone_with_or_without_a_decode_pool(tiny):
    served = ServedModel(version=3, loaded=tiny)
    requests = [{"images": [png_bytes("red"), png_bytes("blue")], "labels": ["red", "blue"]},
                {"images": [png_bytes("green")], "labels": ["a tree", "a car", "green"]},
                {"images": [png_bytes("yellow", size=48)], "labels": ["yellow", "red"]}]
    heads = TextHeadCache(8)
    alone = [served.classify([request], heads)[0] for request in requests]
    with ThreadPoolExecutor(2) as pool:
        pooled = served.classify(requests, heads, pool)
    serial = served.classify(requests, heads)
    assert [a["model_version"] for a in pooled] == [3, 3, 3]
    assert [len(a["results"]) for a in pooled] == [2, 1, 1]
    assert pooled == serial
    for batched, single in zip(scores(pooled), scores(alone)):
        assert batched == pytest.approx(single, abs=1e-5)
    assert all(sum(r["scores"].values()) == pytest.approx(1, abs=1e-4) for a in pooled for r in a["results"])


def test_requests_decoded_apart_give_the_same_answers(tiny):
    """What the classifier does: each request's pixels decoded on their own, the batch holds tensors."""
    served = ServedModel(version=1, loaded=tiny)
    requests = [{"images": [png_bytes("red")], "labels": ["red", "blue"]},
                {"images": [png_bytes("green"), png_bytes("blue")], "labels": ["green", "blue"]}]
    heads = TextHeadCache(8)
    decoded = [{"pixels": served.pixels(r["images"]), "labels": r["labels"]} for r in requests]
    assert served.classify(decoded, heads) == served.classify(requests, heads)


def test_versions_loaded_from_a_template_are_their_own_models(tiny, tmp_path):
    """The second version of an architecture is a copy of the first one built, filled with its own
    weights: it answers as a model loaded alone would, and shares no tensor with the first."""
    import torch

    from gnsp_core.state import ContinualState
    from service.serving.served_model import VersionLoader, load_served_model
    from service.store import ModelStore

    store = ModelStore.open(str(tmp_path / "store"))
    state = ContinualState.initial(tiny.model, tiny.spec)
    store.publish_version(state.save(tmp_path / "a"), {})
    state.weights = {k: v * 1.5 if v.is_floating_point() else v for k, v in state.weights.items()}
    store.publish_version(state.save(tmp_path / "b"), {})

    loader = VersionLoader(store, tmp_path / "cache", device="cpu")
    first, second = loader.load(1), loader.load(2)
    alone = load_served_model(store, 2, tmp_path / "alone", device="cpu")
    assert list(loader.templates) == [tiny.spec]
    assert first.loaded.model is not second.loaded.model
    assert all(a.data_ptr() != b.data_ptr()
               for a, b in zip(first.loaded.model.parameters(), second.loaded.model.parameters()))
    for key, value in second.loaded.model.state_dict().items():
        assert torch.equal(value, alone.loaded.model.state_dict()[key]), key
    request = [{"images": [png_bytes("red")], "labels": ["red", "blue", "a tree"]}]
    first_scores, second_scores, alone_scores = (scores(served.classify(request, TextHeadCache(8)))[0]
                                                 for served in (first, second, alone))
    assert second_scores == pytest.approx(alone_scores, abs=1e-5)
    assert first_scores != pytest.approx(second_scores, abs=1e-3)
