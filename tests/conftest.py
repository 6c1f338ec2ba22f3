"""Tiny models and tiny synthetic tasks, built in a few lines, shared by the tests."""

from __future__ import annotations

import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
from transformers import BertConfig, BertModel

from gnsp_core.data import ImageSamples, Task
from gnsp_core.models import LoadedModel, ModelSpec, load_model
from gnsp_core.models.default import minilm_dir

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


def striped_images(colour: tuple[int, int, int], n: int, seed: int, size: int = 32) -> list[np.ndarray]:
    """Noisy images of one colour with random stripes: easy to tell apart by colour, never identical."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        img = rng.normal(0, 25, (size, size, 3)) + np.array(colour)
        img[:, rng.integers(0, size, 4)] = rng.integers(0, 255)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def colour_task(name: str, colours: list[str], n_train: int, n_test: int = 8, seed: int = 0) -> Task:
    def split(n: int, offset: int) -> ImageSamples:
        images, labels = [], []
        for label, colour in enumerate(colours):
            images += striped_images(COLOURS[colour], n, seed + offset + 31 * label)
            labels += [label] * n
        return ImageSamples(images, labels)

    return Task(name=name, classnames=list(colours), train=split(n_train, 0), test=split(n_test, 1000))


class CaptionList(torch.utils.data.Dataset):
    """Reference (image, caption) pairs for CD/MAP in tests."""

    def __init__(self, samples: ImageSamples, captions: list[str]) -> None:
        self.samples, self.captions = samples, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        return self.samples[i][0], self.captions[i]

    def with_transform(self, transform) -> "CaptionList":
        return CaptionList(self.samples.with_transform(transform), self.captions)


def reference_pairs(n_per_colour: int = 6) -> CaptionList:
    images, captions = [], []
    for i, (name, colour) in enumerate(COLOURS.items()):
        images += striped_images(colour, n_per_colour, 500 + i)
        captions += [f"a photo of something {name}"] * n_per_colour
    return CaptionList(ImageSamples(images, [0] * len(images)), captions)


@pytest.fixture()
def tiny() -> LoadedModel:
    return load_model(ModelSpec(name="tiny", seed=0))


@pytest.fixture()
def reference() -> CaptionList:
    return reference_pairs()


@pytest.fixture(scope="session")
def ray_session(seaweedfs):
    """One private local Ray for every integration test in the session (never a machine-wide one).

    Its processes know the session's SeaweedFS (the AWS variables, as a cluster's nodes would), so
    a service deployed on it can use an `s3://` store; the test process itself gets them only
    where a test asks for `s3_store_uri`."""
    import os

    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # read by the Train controller
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # request metrics reach Ray's export in ~1 s
    with pytest.MonkeyPatch.context() as env:  # the raylet copies the environment once, at start
        for name, value in seaweedfs.env().items():
            env.setenv(name, value)
        ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def releases_its_placement_groups():
    """A module that runs Ray work on the session's Ray leaves no placement group behind: one left
    reserved (a killed run's worker group) holds its CPUs for the rest of the session, and a later
    module's deployment then waits for CPUs that never come."""
    import ray

    from service_support import live_placement_groups, wait_released

    before = live_placement_groups() if ray.is_initialized() else set()
    yield
    if ray.is_initialized():
        wait_released(before, "this module", timeout=60)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """One SeaweedFS S3 server (tests/seaweedfs.py) for the session, stopped whatever happens."""
    from seaweedfs import start_seaweedfs

    with start_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as s3:
        yield s3


@pytest.fixture()
def s3_store_uri(seaweedfs, monkeypatch) -> str:
    """A fresh `s3://gnsp/<prefix>` on the session's SeaweedFS, with the AWS variables set for the test."""
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs.uri()


# The suite runs on two xdist workers (`make test`: -n 2 --dist loadfile --no-loadscope-reorder):
# each test module runs whole on one worker, so its fixtures (a deployed service, a Ray) are set up
# once, and modules are handed out in this order (xdist would otherwise order them by their number
# of tests): the longest first, so the two workers finish near the same time.
LONGEST_FIRST = ["test_multinode", "test_tune", "test_service_e2e", "test_demo", "test_service_tune",
                 "test_openapi_fuzz", "test_default_model", "test_gpu_check", "test_service_bad_input",
                 "test_train_ray", "test_metrics_replicas", "test_deploy"]


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        module = item.module.__name__.rpartition(".")[2]
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.fixture()
def own_ray_slot(tmp_path_factory):
    """Held by a test that starts Ray processes of its own (a `gnsp serve`, a multi-node cluster):
    one such test at a time across the xdist workers of this run, because Ray gives a starting
    node 30 s to register with its GCS and two clusters starting at once on two cores miss that."""
    import fcntl

    with open(tmp_path_factory.getbasetemp().parent / "own-ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


SPLIT_MODEL = "tiny-split"


@pytest.fixture(scope="session")
def split_model_registered(tmp_path_factory):
    """A tiny CLIP shaped like gnsp-mini: a timm trunk + MLP head, a Hugging Face text encoder + projection."""
    root = tmp_path_factory.mktemp("tiny-split")
    text = root / "text"
    torch.manual_seed(0)  # open_clip loads these random weights as if pre-trained
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0), add_pooling_layer=False).save_pretrained(text)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm_dir() / name).is_file():
            shutil.copy(minilm_dir() / name, text / name)
    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 32, "timm_model_name": "test_efficientnet", "timm_model_pretrained": False,
                             "timm_pool": "avg", "timm_proj": "mlp", "timm_proj_bias": False},
              "text_cfg": {"hf_model_name": str(text), "hf_tokenizer_name": str(text), "hf_proj_type": "linear",
                           "hf_pooler_type": "mean_pooler", "context_length": 16}}
    (root / f"{SPLIT_MODEL}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{SPLIT_MODEL}.json")
    return SPLIT_MODEL
