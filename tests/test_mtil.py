"""MTIL loaders on tiny fake trees in each dataset's standard (torchvision) layout, and each dataset
trained and scored with its own class names and prompt templates."""

from __future__ import annotations

import dataclasses
import gzip
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from gnsp_core.config import TrainConfig
from gnsp_core.data import load_task
from gnsp_core.errors import ConfigError, DatasetError
from gnsp_core.data.mtil import (
    MTIL_DATASETS, MTIL_FIRST_TEMPLATES, MTIL_ORDER_I, MTIL_ORDER_II, MTIL_TEMPLATES, load_mtil_task, mtil_sources,
)
from gnsp_core.evaluation import task_accuracy
from gnsp_core.state import ContinualState
from gnsp_core.trainer import learn_task


def img(path: Path, color: tuple[int, int, int] = (10, 200, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def check(task, classnames: list[str], n_train: int, n_test: int) -> None:
    assert task.classnames == classnames
    assert (len(task.train), len(task.test)) == (n_train, n_test)
    image, label = task.test[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and 0 <= label < len(classnames)


def test_orders_and_templates() -> None:
    assert len(MTIL_ORDER_I) == len(MTIL_ORDER_II) == 11 and set(MTIL_ORDER_I) == set(MTIL_ORDER_II)
    assert MTIL_ORDER_I[0] == "aircraft" and MTIL_ORDER_II[0] == "cars"
    assert set(MTIL_FIRST_TEMPLATES) == set(MTIL_DATASETS)
    assert mtil_sources(MTIL_ORDER_II[:2], "/data") == ["mtil:cars@/data", "mtil:food@/data"]


def make_caltech101(root: Path) -> None:
    for cls in ("BACKGROUND_Google", "Faces_easy", "accordion", "car_side"):
        for i in range(1, 11):
            img(root / "caltech101" / "101_ObjectCategories" / cls / f"image_{i:04d}.jpg", (i * 20, 0, 0))


def test_caltech101_folders_names_and_seed42_split(tmp_path: Path) -> None:
    base = tmp_path / "caltech101" / "101_ObjectCategories"
    make_caltech101(tmp_path)
    task = load_mtil_task("caltech101", tmp_path)
    check(task, ["centered face", "accordion", "side of a car"], 24, 6)
    classes = ("Faces_easy", "accordion", "car_side")
    order = [str(base / c / f"image_{i:04d}.jpg") for c in classes for i in range(1, 11)]
    train, _ = torch.utils.data.random_split(order, [24, 6], generator=torch.Generator().manual_seed(42))
    assert task.train.images == list(train)  # exactly ZSCL's split
    assert load_mtil_task("caltech101", tmp_path).test.images == task.test.images


def make_eurosat(root: Path) -> None:
    for cls in ("AnnualCrop", "SeaLake", "Highway"):
        for i in range(5):
            img(root / "eurosat" / "2750" / cls / f"{cls}_{i}.jpg")


def test_eurosat_imagefolder_with_clip_names(tmp_path: Path) -> None:
    make_eurosat(tmp_path)
    task = load_task(f"mtil:eurosat@{tmp_path}")
    check(task, ["annual crop land", "highway or road", "lake or sea"], 12, 3)
    assert task.name == "eurosat"


def make_dtd(root: Path) -> None:
    data = root / "dtd" / "dtd"
    rows = {"train1": ["banded/b1.jpg", "zig_zagged/z1.jpg", "banded/b2.jpg"], "test1": ["zig_zagged/z2.jpg"],
            "val1": ["banded/b3.jpg"]}
    for name, lines in rows.items():
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            img(data / "images" / line)


def test_dtd_label_files(tmp_path: Path) -> None:
    make_dtd(tmp_path)
    task = load_mtil_task("DTD", tmp_path)
    check(task, ["banded", "zig zagged"], 3, 1)
    assert task.train.labels == [0, 1, 0] and task.test.labels == [1]


def make_aircraft(root: Path) -> None:
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nA320\nF-16A/B\n")
    (data / "images_variant_train.txt").write_text("0001 707-320\n0002 F-16A/B\n0003 A320\n")
    (data / "images_variant_test.txt").write_text("0004 A320\n")
    for i in range(1, 5):
        img(data / "images" / f"{i:04d}.jpg")


def test_aircraft_annotation_files(tmp_path: Path) -> None:
    make_aircraft(tmp_path)
    task = load_mtil_task("aircraft", tmp_path)
    check(task, ["707-320", "A320", "F-16A/B"], 3, 1)
    assert task.train.labels == [0, 2, 1]


def make_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((4, 3072), np.uint8)
    data[0, :1024] = 255  # image 0: red channel full
    for name, n in (("train", 4), ("test", 2)):
        batch = {"data": data[:n], "fine_labels": [0, 1, 1, 0][:n], "filenames": ["x"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "aquarium_fish"]}))


def test_cifar100_pickled_batches(tmp_path: Path) -> None:
    make_cifar100(tmp_path)
    task = load_mtil_task("cifar100", tmp_path)
    check(task, ["apple", "aquarium fish"], 4, 2)
    assert task.train[0][0].getpixel((5, 5)) == (255, 0, 0) and task.train[0][0].size == (32, 32)


def test_cifar100_refuses_code_in_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["a"], "x": Path("/")}))
    with pytest.raises(DatasetError, match="refusing to load"):
        load_mtil_task("cifar100", tmp_path)


def make_flowers(root: Path) -> None:
    base = root / "flowers-102"
    for i in range(1, 6):
        img(base / "jpg" / f"image_{i:05d}.jpg")
    savemat(base / "imagelabels.mat", {"labels": np.array([[1, 2, 1, 2, 102]])})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]), "tstid": np.array([[4, 5]])})


def test_flowers_mat_files(tmp_path: Path) -> None:
    make_flowers(tmp_path)
    task = load_mtil_task("flowers", tmp_path)
    assert len(task.classnames) == 102 and task.classnames[0] == "pink primrose"
    assert task.train.labels == [0, 1] and task.test.labels == [1, 101]
    check(task, task.classnames, 2, 2)


def make_food(root: Path) -> None:
    base = root / "food-101"
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "ramen": ["ramen/3"]},
            "test": {"apple_pie": ["apple_pie/4"], "ramen": ["ramen/5"]}}
    (base / "meta").mkdir(parents=True)
    for split, m in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(m))
        for rels in m.values():
            for rel in rels:
                img(base / "images" / f"{rel}.jpg")


def test_food_json_meta(tmp_path: Path) -> None:
    make_food(tmp_path)
    check(load_mtil_task("food", tmp_path), ["apple pie", "ramen"], 3, 2)


MNIST_IMAGES = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256


def make_mnist(root: Path) -> None:
    raw = root / "MNIST" / "raw"
    images = MNIST_IMAGES
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", np.array([3, 1, 4]))
    write_idx(raw / "t10k-images-idx3-ubyte.gz", images[:2])
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.array([1, 5]))


def test_mnist_raw_idx_plain_and_gzipped(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    images = MNIST_IMAGES
    task = load_mtil_task("mnist", tmp_path)
    check(task, task.classnames, 3, 2)
    assert task.classnames[3] == "3 - three" and task.train.labels == [3, 1, 4]
    assert np.array_equal(np.asarray(task.train[1][0])[..., 0], images[1])


def make_oxfordpet(root: Path) -> None:
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    (base / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\namerican_bulldog_2 2 2 1\n")
    (base / "annotations" / "test.txt").write_text("Abyssinian_3 1 1 1\n")
    for name in ("Abyssinian_1", "american_bulldog_2", "Abyssinian_3"):
        img(base / "images" / f"{name}.jpg")


def test_oxford_pet_annotations(tmp_path: Path) -> None:
    make_oxfordpet(tmp_path)
    check(load_mtil_task("oxfordpet", tmp_path), ["Abyssinian", "American Bulldog"], 2, 1)


def make_cars(root: Path) -> None:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]], dtype=object)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})

    def annos(path: Path, rows: list[tuple[str, int]]) -> None:
        arr = np.zeros((1, len(rows)), dtype=[("fname", "O"), ("class", "O")])
        for i, (fname, cls) in enumerate(rows):
            arr[0, i] = (fname, np.array([[cls]], dtype=np.uint8))
        savemat(path, {"annotations": arr})

    annos(base / "devkit" / "cars_train_annos.mat", [("00001.jpg", 2), ("00002.jpg", 1)])
    annos(base / "cars_test_annos_withlabels.mat", [("00001.jpg", 1)])
    for split, n in (("cars_train", 2), ("cars_test", 1)):
        for i in range(1, n + 1):
            img(base / split / f"{i:05d}.jpg")


def test_stanford_cars_mat_annotations(tmp_path: Path) -> None:
    make_cars(tmp_path)
    task = load_mtil_task("cars", tmp_path)
    check(task, ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], 2, 1)
    assert task.train.labels == [1, 0]


def make_sun397(root: Path) -> None:
    data = root / "SUN397"
    data.mkdir()
    (data / "ClassName.txt").write_text("/a/abbey\n/b/bakery/shop\n")
    for i in range(5):
        img(data / "a" / "abbey" / f"sun_a{i}.jpg")
        img(data / "b" / "bakery" / "shop" / f"sun_b{i}.jpg")


def test_sun397_nested_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_sun397(tmp_path)
    monkeypatch.setenv("GNSP_MTIL_ROOT", str(tmp_path))
    task = load_task("mtil:sun397", max_train_per_class=2)
    assert task.classnames == ["abbey", "bakery (shop)"]
    assert len(task.test) == 2 and len(task.train) <= 4
    assert {Path(p).parent.name for p, y in zip(task.train.images, task.train.labels) if y == 1} <= {"shop"}


def test_helpful_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetError, match="unknown MTIL dataset"):
        load_mtil_task("imagenet", tmp_path)
    with pytest.raises(DatasetError, match=r"expected .*fgvc-aircraft-2013b"):
        load_mtil_task("aircraft", tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        load_mtil_task("dtd", tmp_path / "missing")
    monkeypatch.delenv("GNSP_MTIL_ROOT", raising=False)
    with pytest.raises(DatasetError, match="GNSP_MTIL_ROOT"):
        load_task("mtil:dtd")


FAKE_TREES: dict[str, Callable[[Path], None]] = {
    "aircraft": make_aircraft, "caltech101": make_caltech101, "cifar100": make_cifar100, "dtd": make_dtd,
    "eurosat": make_eurosat, "flowers": make_flowers, "food": make_food, "mnist": make_mnist,
    "oxfordpet": make_oxfordpet, "cars": make_cars, "sun397": make_sun397,
}


class RecordingTokenizer:
    """The model's tokenizer, keeping every text it was asked to tokenize."""

    def __init__(self, tokenizer: Callable) -> None:
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, texts: list[str]):
        self.texts += list(texts)
        return self.tokenizer(texts)


def test_every_dataset_has_its_zscl_ensemble() -> None:
    assert set(MTIL_TEMPLATES) == set(MTIL_DATASETS)
    assert {name: templates[0] for name, templates in MTIL_TEMPLATES.items()} == MTIL_FIRST_TEMPLATES
    assert MTIL_FIRST_TEMPLATES["aircraft"] == "a photo of a {}, a type of aircraft."
    assert MTIL_FIRST_TEMPLATES["mnist"] == 'a photo of the number: "{}".'
    sizes = {name: len(t) for name, t in MTIL_TEMPLATES.items()}
    assert sizes == {"aircraft": 2, "caltech101": 34, "cifar100": 18, "dtd": 8, "eurosat": 3, "flowers": 1,
                     "food": 1, "mnist": 1, "oxfordpet": 1, "cars": 9, "sun397": 2}


@pytest.mark.parametrize("dataset", MTIL_ORDER_I)
def test_each_dataset_trains_and_scores_with_its_own_names_and_templates(dataset: str, tmp_path: Path, tiny) -> None:
    FAKE_TREES[dataset](tmp_path)
    task = load_task(f"mtil:{dataset}@{tmp_path}")
    names, templates = task.classnames, MTIL_TEMPLATES[dataset]
    assert task.templates == templates
    tokenizer = RecordingTokenizer(tiny.tokenizer)
    loaded = dataclasses.replace(tiny, tokenizer=tokenizer)
    config = TrainConfig(method="finetune", steps=1, batch_size=2, warmup_steps=1, lr=1e-3)
    losses: list[float] = []
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    state = learn_task(ContinualState.initial(loaded.model, loaded.spec), loaded, task, config,
                       progress=lambda p: losses.append(p.loss))
    assert tokenizer.texts == [templates[0].format(c) for c in names]  # trains on the first template only
    assert len(losses) == 1 and state.history[-1].classnames == names
    assert any(not torch.equal(before[k], v) for k, v in state.weights.items())  # it trained
    tokenizer.texts.clear()
    loaded.model.load_state_dict(state.weights)
    accuracy = task_accuracy(loaded, task)
    assert tokenizer.texts == [t.format(c) for c in names for t in templates]  # scored with the whole ensemble
    assert 0.0 <= accuracy <= 100.0
    explicit = task_accuracy(loaded, task, templates=["a {}."])
    assert tokenizer.texts[-len(names):] == [f"a {c}." for c in names] and 0.0 <= explicit <= 100.0


def test_an_explicit_template_replaces_the_first_one_in_training_only(tmp_path: Path, tiny) -> None:
    make_eurosat(tmp_path)
    task = load_task(f"mtil:eurosat@{tmp_path}")
    tokenizer = RecordingTokenizer(tiny.tokenizer)
    loaded = dataclasses.replace(tiny, tokenizer=tokenizer)
    config = TrainConfig(method="finetune", steps=1, batch_size=2, warmup_steps=1, template="satellite view of {}")
    learn_task(ContinualState.initial(loaded.model, loaded.spec), loaded, task, config)
    assert tokenizer.texts == [f"satellite view of {c}" for c in task.classnames]
    with pytest.raises(ConfigError, match="template"):
        TrainConfig(template="no slot").validate()
