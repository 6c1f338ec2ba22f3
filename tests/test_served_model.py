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
