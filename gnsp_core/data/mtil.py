"""The MTIL benchmark (11 datasets) from data already on disk, in torchvision's standard layouts.

Source syntax for `load_task`: `mtil:<dataset>@<root>`, or `mtil:<dataset>` with the root in the
`GNSP_MTIL_ROOT` environment variable; `<dataset>` is one of MTIL_DATASETS. Expected layout under
`<root>` (what torchvision's `download=True` produces):

    aircraft    fgvc-aircraft-2013b/data/{variants.txt, images_variant_{train,test}.txt, images/}
    caltech101  caltech101/101_ObjectCategories/<category>/   (BACKGROUND_Google is skipped)
    cifar100    cifar-100-python/{train, test, meta}
    dtd         dtd/dtd/{images/<class>/, labels/{train1,test1}.txt}
    eurosat     eurosat/2750/<class>/
    flowers     flowers-102/{jpg/, imagelabels.mat, setid.mat}
    food        food-101/{images/<class>/, meta/{train,test}.json}
    mnist       MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    oxfordpet   oxford-iiit-pet/{images/, annotations/{trainval,test}.txt}
    cars        stanford_cars/{devkit/{cars_meta,cars_train_annos}.mat, cars_train/, cars_test/,
                cars_test_annos_withlabels.mat}
    sun397      SUN397/{ClassName.txt, <letter>/<class>/sun_*.jpg}

Each task carries ZSCL's class names and prompt templates for its dataset (mtil_names.py): it
trains on the first template and is scored with the whole ensemble. Splits follow ZSCL: the
official train/test splits (Aircraft train/test, DTD train1/test1, Flowers train/test, Pets
trainval/test), except Caltech101, EuroSAT and SUN397, split 80/20 at
random with seed 42 exactly as `torch.utils.data.random_split` does (SUN397 files sorted first,
so the split is the same on every machine). The folders are read directly rather than through
torchvision's classes, which check archive checksums (CIFAR100, Flowers) and expose their file
lists only as private attributes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from gnsp_core.data import mtil_names
from gnsp_core.data.array_io import load_array_pickle, read_idx
from gnsp_core.data.samples import ImageLike, ImageSamples, Task
from gnsp_core.errors import DatasetError

MTIL_ORDER_I = ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist",
                "oxfordpet", "cars", "sun397"]
MTIL_ORDER_II = ["cars", "food", "mnist", "oxfordpet", "flowers", "sun397", "aircraft", "caltech101", "dtd",
                 "eurosat", "cifar100"]
MTIL_DATASETS = sorted(MTIL_ORDER_I)
MTIL_TEMPLATES = mtil_names.TEMPLATES
MTIL_FIRST_TEMPLATES = mtil_names.FIRST_TEMPLATES
ROOT_ENV = "GNSP_MTIL_ROOT"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

Samples = tuple[list[ImageLike], list[int]]
Loaded = tuple[list[str], Samples, Samples]
"""(class names, train, test)"""


def mtil_sources(order: Sequence[str] = MTIL_ORDER_I, root: str | Path | None = None) -> list[str]:
    """Task source strings for an MTIL order, e.g. for `gnsp bench --tasks`."""
    suffix = "" if root is None else f"@{root}"
    return [f"mtil:{name}{suffix}" for name in order]


def load_mtil_source(spec: str) -> Task:
    """Parse `<dataset>@<root>` (or `<dataset>` with $GNSP_MTIL_ROOT) and load it."""
    name, _, root = spec.partition("@")
    root = root or os.environ.get(ROOT_ENV, "")
    if not root:
        raise DatasetError(f"mtil:{name} needs a data root: write mtil:{name}@/path/to/data or set {ROOT_ENV}")
    return load_mtil_task(name, root)


def load_mtil_task(name: str, root: str | Path) -> Task:
    """One MTIL dataset as a Task, from `root` in torchvision's layout (see module docstring)."""
    key = name.strip().lower()
    if key not in _LOADERS:
        raise DatasetError(f"unknown MTIL dataset {name!r}; choose one of {MTIL_DATASETS}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"MTIL data root {root} is not a folder")
    classnames, train, test = _LOADERS[key](root)
    return Task(name=key, classnames=list(classnames), train=ImageSamples(*train), test=ImageSamples(*test),
                templates=MTIL_TEMPLATES[key])


def _need(path: Path, dataset: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{dataset}: expected {path} (torchvision's layout; see gnsp_core/data/mtil.py)")
    return path


def _lines(path: Path, dataset: str) -> list[str]:
    """The non-empty, stripped lines of a text annotation file."""
    return [line.strip() for line in _need(path, dataset).read_text().splitlines() if line.strip()]


def _unzip(pairs: Iterable[tuple[ImageLike, int]]) -> Samples:
    pairs = list(pairs)
    return [image for image, _ in pairs], [label for _, label in pairs]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())


def _random_split(samples: Samples, fraction: float = 0.8, seed: int = 42) -> tuple[Samples, Samples]:
    """torch.utils.data.random_split(dataset, [int(0.8 n), rest], Generator().manual_seed(42))."""
    images, labels = samples
    n_train = int(fraction * len(images))
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    train, test = perm[:n_train], perm[n_train:]
    return _unzip((images[i], labels[i]) for i in train), _unzip((images[i], labels[i]) for i in test)


def _folder_classes(folder: Path, names: Callable[[str], str], skip: Sequence[str] = ()) -> tuple[list[str], Samples]:
    """ImageFolder-style: sorted class folders, sorted files inside each."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in skip)
    images: list[ImageLike] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        files = _images_in(folder / cls)
        images += [str(f) for f in files]
        labels += [label] * len(files)
    if len(classes) < 2:
        raise DatasetError(f"{folder} has {len(classes)} class folders; is the dataset fully extracted?")
    return [names(c) for c in classes], (images, labels)


def _space(name: str) -> str:
    return name.replace("_", " ")


def _aircraft(root: Path) -> Loaded:
    data = _need(root / "fgvc-aircraft-2013b" / "data", "aircraft")
    classes = _lines(data / "variants.txt", "aircraft")
    index = {c: i for i, c in enumerate(classes)}

    def split(name: str) -> Samples:
        rows = [line.split(" ", 1) for line in _lines(data / f"images_variant_{name}.txt", "aircraft")]
        return [str(data / "images" / f"{img}.jpg") for img, _ in rows], [index[c] for _, c in rows]

    return classes, split("train"), split("test")


def _caltech101(root: Path) -> Loaded:
    folder = _need(root / "caltech101" / "101_ObjectCategories", "caltech101")
    names, samples = _folder_classes(folder, lambda c: mtil_names.CALTECH101.get(c, _space(c)), ["BACKGROUND_Google"])
    return (names, *_random_split(samples))


def _cifar100(root: Path) -> Loaded:
    folder = _need(root / "cifar-100-python", "cifar100")

    def split(name: str) -> Samples:
        batch = load_array_pickle(_need(folder / name, "cifar100"))
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return list(images), [int(y) for y in batch["fine_labels"]]

    meta = load_array_pickle(_need(folder / "meta", "cifar100"))
    return [_space(c) for c in meta["fine_label_names"]], split("train"), split("test")


def _dtd(root: Path) -> Loaded:
    data = _need(root / "dtd" / "dtd", "dtd")

    def rows(name: str) -> list[tuple[str, str]]:
        pairs = (line.split("/", 1) for line in _lines(data / "labels" / f"{name}1.txt", "dtd"))
        return [(cls, file) for cls, file in pairs]

    train_rows, test_rows = rows("train"), rows("test")
    classes = sorted({cls for cls, _ in train_rows})
    index = {c: i for i, c in enumerate(classes)}
    split = [_unzip((str(data / "images" / c / f), index[c]) for c, f in rs) for rs in (train_rows, test_rows)]
    return [_space(c) for c in classes], *split


def _eurosat(root: Path) -> Loaded:
    folder = _need(root / "eurosat" / "2750", "eurosat")
    names, samples = _folder_classes(folder, lambda c: mtil_names.EUROSAT.get(c, _space(c)))
    return (names, *_random_split(samples))


def _flowers(root: Path) -> Loaded:
    from scipy.io import loadmat

    base = _need(root / "flowers-102", "flowers")
    set_ids = loadmat(_need(base / "setid.mat", "flowers"), squeeze_me=True)
    labels = np.atleast_1d(loadmat(_need(base / "imagelabels.mat", "flowers"), squeeze_me=True)["labels"]) - 1

    def split(key: str) -> Samples:
        ids = np.atleast_1d(set_ids[key]).tolist()
        return [str(base / "jpg" / f"image_{i:05d}.jpg") for i in ids], [int(labels[i - 1]) for i in ids]

    return list(mtil_names.FLOWERS), split("trnid"), split("tstid")


def _food(root: Path) -> Loaded:
    base = _need(root / "food-101", "food")

    def meta(name: str) -> dict[str, list[str]]:
        return json.loads(_need(base / "meta" / f"{name}.json", "food").read_text())

    train_meta, test_meta = meta("train"), meta("test")
    classes = sorted(train_meta)
    index = {c: i for i, c in enumerate(classes)}

    def split(m: dict[str, list[str]]) -> Samples:
        return _unzip((str(base / "images" / f"{rel}.jpg"), index[c]) for c, rels in m.items() for rel in rels)

    return [_space(c) for c in classes], split(train_meta), split(test_meta)


def _mnist(root: Path) -> Loaded:
    raw = _need(root / "MNIST" / "raw", "mnist")

    def file(stem: str) -> Path:
        return raw / stem if (raw / stem).exists() else _need(raw / f"{stem}.gz", "mnist")

    def split(prefix: str) -> Samples:
        images = read_idx(file(f"{prefix}-images-idx3-ubyte"))
        return list(images), read_idx(file(f"{prefix}-labels-idx1-ubyte")).astype(int).tolist()

    return list(mtil_names.MNIST), split("train"), split("t10k")


def _oxfordpet(root: Path) -> Loaded:
    base = _need(root / "oxford-iiit-pet", "oxfordpet")

    def rows(name: str) -> list[tuple[str, int]]:
        lines = _lines(base / "annotations" / f"{name}.txt", "oxfordpet")
        return [(p[0], int(p[1]) - 1) for p in (line.split() for line in lines if not line.startswith("#"))]

    train_rows, test_rows = rows("trainval"), rows("test")
    breeds = dict(sorted({label: img.rsplit("_", 1)[0] for img, label in train_rows + test_rows}.items()))
    names = [" ".join(part.title() for part in raw.split("_")) for raw in breeds.values()]
    split = [_unzip((str(base / "images" / f"{img}.jpg"), y) for img, y in rs) for rs in (train_rows, test_rows)]
    return names, *split


def _cars(root: Path) -> Loaded:
    from scipy.io import loadmat

    base = _need(root / "stanford_cars", "cars")
    devkit = _need(base / "devkit", "cars")

    def split(annos: Path, images: Path) -> Samples:
        rows = np.atleast_1d(loadmat(_need(annos, "cars"), squeeze_me=True)["annotations"])
        return [str(images / str(a["fname"])) for a in rows], [int(a["class"]) - 1 for a in rows]

    meta = loadmat(_need(devkit / "cars_meta.mat", "cars"), squeeze_me=True)
    names = [str(n) for n in np.atleast_1d(meta["class_names"])]
    return (names, split(devkit / "cars_train_annos.mat", base / "cars_train"),
            split(base / "cars_test_annos_withlabels.mat", base / "cars_test"))


def _sun397(root: Path) -> Loaded:
    data = _need(root / "SUN397", "sun397")
    keys = [line[3:] for line in _lines(data / "ClassName.txt", "sun397")]  # "/a/abbey" -> "abbey"
    index = {k: i for i, k in enumerate(keys)}
    files = sorted(data.rglob("sun_*.jpg"))
    labels = []
    for f in files:
        key = "/".join(f.relative_to(data).parts[1:-1])
        if key not in index:
            raise DatasetError(f"sun397: {f} is in class {key!r}, which ClassName.txt does not list")
        labels.append(index[key])
    names = [_space(k.split("/")[0]) + "".join(f" ({_space(p)})" for p in k.split("/")[1:]) for k in keys]
    return (names, *_random_split(([str(f) for f in files], labels)))


_LOADERS: dict[str, Callable[[Path], Loaded]] = {
    "aircraft": _aircraft, "caltech101": _caltech101, "cifar100": _cifar100, "dtd": _dtd, "eurosat": _eurosat,
    "flowers": _flowers, "food": _food, "mnist": _mnist, "oxfordpet": _oxfordpet, "cars": _cars, "sun397": _sun397,
}
