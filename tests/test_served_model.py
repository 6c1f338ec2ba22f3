"""A served version answers a batch of requests as it would answer each alone, pool or not."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from gnsp_core.zeroshot import TextHeadCache
from service.serving.served_model import ServedModel
from service_support import png_bytes


def scores(answers: list[dict]) -> list[list[float]]:
    return [[p for result in answer["results"] for p in result["scores"].values()] for answer in answers]


def store_of_two_versions(loaded, tmp_path, scale: float):
    """A store holding `loaded`'s weights as version 1 and the same scaled by `scale` as version 2."""
    from gnsp_core.state import ContinualState
    from service.store import ModelStore

    store = ModelStore.open(str(tmp_path / "store"))
    state = ContinualState.initial(loaded.model, loaded.spec)
    store.publish_version(state.save(tmp_path / "a"), {})
    state.weights = {k: v * scale if v.is_floating_point() else v for k, v in state.weights.items()}
    store.publish_version(state.save(tmp_path / "b"), {})
    return store


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

    from service.serving.served_model import VersionLoader, load_served_model

    store = store_of_two_versions(tiny, tmp_path, scale=1.5)
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


def test_a_batch_pinned_to_versions_in_turn_takes_one_tower_pass_per_version():
    """Requests pinned to versions 2, 3, 2, 3, 4 in turn: three groups, each in arrival order."""
    from types import SimpleNamespace

    from service.serving.classifier import version_groups

    requests = [{"served": SimpleNamespace(version=v)} for v in (2, 3, 2, 3, 4, 2)]
    assert version_groups(requests) == [[0, 2, 5], [1, 3], [4]]
    assert version_groups([]) == []


def test_a_mixed_batch_is_answered_in_its_requests_order():
    from types import SimpleNamespace

    from service.serving.classifier import Classifier

    class Version:
        def __init__(self, version: int) -> None:
            self.version, self.passes = version, 0

        def classify(self, group: list[dict], heads: object) -> list[dict]:
            self.passes += 1
            return [{"model_version": self.version, "request": r["id"]} for r in group]

    two, three = Version(2), Version(3)
    requests = [{"served": v, "id": i} for i, v in enumerate((two, three, two, three, two))]
    answers = Classifier.func_or_class.forward(SimpleNamespace(heads=None), requests)
    assert [a["request"] for a in answers] == [0, 1, 2, 3, 4]
    assert [a["model_version"] for a in answers] == [2, 3, 2, 3, 2]
    assert (two.passes, three.passes) == (1, 1)


def test_a_request_pinned_to_an_old_version_is_answered_aside_as_in_a_batch(tiny):
    """The classifier answers a request for a version other than the active one on its low-priority
    thread, whole: checked, decoded, one pass; the answer equals the batched one."""
    from types import SimpleNamespace

    from service.errors import InvalidImageError
    from service.serving.classifier import Classifier

    served, heads = ServedModel(version=2, loaded=tiny), TextHeadCache(8)
    images = [png_bytes(colour) for colour in ("red", "green", "blue")]
    labels = ["red", "green", "blue", "yellow"]
    batched = served.classify([{"images": images, "labels": labels}], heads)[0]
    replica = SimpleNamespace(heads=heads, settings=SimpleNamespace(max_classify_pixels=4096 * 4096))
    replica.pixel = lambda *args: Classifier.func_or_class.pixel(replica, *args)
    aside = Classifier.func_or_class.classify_aside(replica, served, images, labels, False)
    assert aside["model_version"] == 2
    assert scores([aside])[0] == pytest.approx(scores([batched])[0], abs=1e-5)
    with pytest.raises(InvalidImageError):
        Classifier.func_or_class.classify_aside(replica, served, [images[0], b"not an image"], labels, False)


def test_served_versions_of_a_batch_norm_tower_run_traced_graphs_that_answer_as_eager(split_model_registered,
                                                                                       tmp_path):
    """A classifier replica serves a prepared (batch norms folded) image tower as a TorchScript
    graph traced once per architecture; each version's copy carries its own weights."""
    import torch

    from gnsp_core.models import load_model
    from gnsp_core.models.inference import prepare_image_tower
    from gnsp_core.models.spec import ModelSpec
    from gnsp_core.state import ContinualState
    from service.serving.served_model import VersionLoader

    loaded = load_model(ModelSpec(name=split_model_registered), "cpu")
    store = store_of_two_versions(loaded, tmp_path, scale=1.25)

    loader = VersionLoader(store, tmp_path / "cache", device="cpu")
    first, second = loader.load(1), loader.load(2)
    assert first.prepared and second.prepared
    assert all(isinstance(s.loaded.model.visual.graph, torch.jit.ScriptModule) for s in (first, second))
    assert first.loaded.image_size == loaded.image_size
    assert list(loader.traced) == [loaded.spec]
    for version, served in ((1, first), (2, second)):
        eager = load_model(ModelSpec(name=split_model_registered), "cpu")
        eager.model.load_state_dict(ContinualState.load(store.fetch_version(version, tmp_path / "e")).weights)
        prepare_image_tower(eager.model, eager.image_size)
        request = [{"images": [png_bytes("red"), png_bytes("blue")], "labels": ["red", "blue", "a tree"]}]
        answer = served.classify(request, TextHeadCache(8))
        eager_answer = ServedModel(version, eager, prepared=True).classify(request, TextHeadCache(8))
        assert scores(answer)[0] == pytest.approx(scores(eager_answer)[0], abs=1e-5)
    assert scores(first.classify(request, TextHeadCache(8)))[0] != pytest.approx(
        scores(second.classify(request, TextHeadCache(8)))[0], abs=1e-4)
