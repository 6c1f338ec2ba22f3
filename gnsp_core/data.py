"""Task datasets: labelled images with class names, from built-ins, ImageFolder dirs or archives.

A task source is one of
- a built-in name (`digits`, `mnist`, `animals`, `textiles`, `fashion`; see builtin_tasks.py),
- `mtil:<dataset>@<root>` for the real MTIL benchmark data on disk (see mtil.py),
- a folder in ImageFolder layout, `root/<class>/<images>`, or with `root/train/<class>/...` and
  `root/test/<class>/...` splits,
- a `.zip`, `.tar`, `.tar.gz` or `.tgz` of such a folder (a single wrapping top-level folder is fine).

Label ids follow the sorted class-folder names. Class names are the folder names with `_` as a
space, unless `classes.json` at the layout root maps folder -> name. Without split folders, a
stratified split is drawn per class from `seed`, so the same seed always gives the same split.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .archives import ArchiveLimits, safe_extract
from .errors import DatasetError
from .folders import FolderLayout, validate_image_folder

__all__ = [
    "ArchiveLimits", "FolderLayout", "ImageLike", "ImageSamples", "Task", "cap_task", "load_task",
    "per_class_subset", "safe_extract", "split_per_class", "to_rgb", "validate_image_folder",
]

ImageLike = str | Path | Image.Image | np.ndarray
Transform = Callable[[Image.Image], Any]
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def to_rgb(item: ImageLike) -> Image.Image:
    """Any supported image form -> an RGB PIL image (transparency composited onto white)."""
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3))):
            raise DatasetError(f"image arrays must be uint8 HxW or HxWx3, got {item.dtype} {item.shape}")
        img = Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item)
    elif isinstance(item, Image.Image):
        img = item
    else:
        with Image.open(item) as opened:
            opened.load()
            img = opened
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return img.convert("RGB")


class ImageSamples(torch.utils.data.Dataset):
    """Labelled images (paths, PIL images or uint8 arrays), decoded to RGB only when indexed."""

    def __init__(self, images: Sequence[ImageLike], labels: Sequence[int], transform: Transform | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images: list[ImageLike] = list(images)
        self.labels: list[int] = [int(y) for y in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = to_rgb(self.images[index])
        return (img if self.transform is None else self.transform(img)), self.labels[index]

    def with_transform(self, transform: Transform | None) -> ImageSamples:
        """A shallow copy sharing the image list, so train and eval views cost nothing."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def subset(self, indices: Sequence[int]) -> ImageSamples:
        return ImageSamples([self.images[i] for i in indices], [self.labels[i] for i in indices], self.transform)


@dataclass
class Task:
    """One continual-learning task: its class names (label id = position) and its two splits."""

    name: str
    classnames: list[str]
    train: ImageSamples
    test: ImageSamples

    def with_transforms(self, train_transform: Transform | None, test_transform: Transform | None) -> Task:
        return dataclasses.replace(
            self, train=self.train.with_transform(train_transform), test=self.test.with_transform(test_transform)
        )


def split_per_class(labels: Sequence[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified train/test indices: per class a seeded shuffle, about `test_fraction` to test.

    Every class with 2+ items keeps at least one item on each side. Each class has its own
    generator, so adding a class never changes the split of the others.
    """
    train, test = [], []
    for label, idx in _by_class(labels).items():
        idx = _shuffled(idx, seed, label)
        n_test = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(len(idx) * test_fraction)))
        test += idx[:n_test]
        train += idx[n_test:]
    return sorted(train), sorted(test)


def per_class_subset(labels: Sequence[int], max_per_class: int | None, seed: int) -> list[int]:
    """Indices of at most `max_per_class` items per class (a seeded choice), ascending."""
    if max_per_class is None:
        return list(range(len(labels)))
    return sorted(i for label, idx in _by_class(labels).items() for i in _shuffled(idx, seed, label)[:max_per_class])


def _by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(int(y), []).append(i)
    return groups


def _shuffled(idx: list[int], seed: int, label: int) -> list[int]:
    rng = np.random.default_rng([seed, label])
    return [idx[j] for j in rng.permutation(len(idx))]


def load_task(
    source: str | Path,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    work_dir: str | Path | None = None,
    limits: ArchiveLimits = ArchiveLimits(),
) -> Task:
    """Load a task from any source (see the module docstring).

    Built-in and MTIL tasks have fixed splits (comparable across runs), so `seed` and
    `test_fraction` only matter for folders and archives without train/test folders; `seed`
    also picks which items the per-class caps keep. Archives are extracted into a new folder
    under `work_dir` (default: the system temp dir); the task's images stay there, so the
    caller owns that folder's lifetime. A built-in name wins over a folder of the same name
    (write `./digits` for the folder).
    """
    source = str(source)
    _check_args(seed, test_fraction, max_train_per_class, max_test_per_class)
    caps = (max_train_per_class, max_test_per_class)
    if source.startswith("mtil:"):
        from .mtil import load_mtil_source

        return cap_task(load_mtil_source(source[len("mtil:"):]), *caps, seed=seed)
    from .builtin_tasks import BUILTIN_TASKS, load_builtin

    if source in BUILTIN_TASKS:
        return load_builtin(source, max_train_per_class=max_train_per_class, max_test_per_class=max_test_per_class)
    path = Path(source).expanduser()
    if path.is_dir():
        layout, name = validate_image_folder(path, limits), path.name
    elif path.is_file():
        layout, name = _extract_and_validate(path, work_dir, limits), _archive_stem(path)
    else:
        raise DatasetError(
            f"unknown task source {source!r}: use a built-in name ({', '.join(sorted(BUILTIN_TASKS))}), "
            "an existing ImageFolder directory, a .zip/.tar/.tar.gz of one, or mtil:<dataset>@<root>"
        )
    return cap_task(_task_from_layout(name, layout, test_fraction, seed), *caps, seed=seed)


def cap_task(task: Task, max_train_per_class: int | None, max_test_per_class: int | None, *, seed: int) -> Task:
    """Keep at most N items per class in each split (seeded choice); None keeps everything."""
    return dataclasses.replace(
        task,
        train=task.train.subset(per_class_subset(task.train.labels, max_train_per_class, seed)),
        test=task.test.subset(per_class_subset(task.test.labels, max_test_per_class, seed)),
    )


def _task_from_layout(name: str, layout: FolderLayout, test_fraction: float, seed: int) -> Task:
    label_of = {folder: i for i, folder in enumerate(layout.folders)}

    def samples(split: dict[str, list[Path]]) -> ImageSamples:
        pairs = [(f, label_of[folder]) for folder, files in split.items() for f in files]
        return ImageSamples([str(f) for f, _ in pairs], [y for _, y in pairs])

    if "all" in layout.splits:
        everything = samples(layout.splits["all"])
        train_idx, test_idx = split_per_class(everything.labels, test_fraction, seed)
        train, test = everything.subset(train_idx), everything.subset(test_idx)
    else:
        train, test = samples(layout.splits["train"]), samples(layout.splits["test"])
    return Task(name=name, classnames=list(layout.classnames), train=train, test=test)


def _extract_and_validate(archive: Path, work_dir: str | Path | None, limits: ArchiveLimits) -> FolderLayout:
    dest = Path(tempfile.mkdtemp(prefix="gnsp-task-", dir=work_dir))
    try:
        return validate_image_folder(safe_extract(archive, dest, limits), limits)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _archive_stem(path: Path) -> str:
    lower = path.name.lower()
    for suffix in _ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)] or path.name
    return path.stem


def _check_args(seed: int, test_fraction: float, *caps: int | None) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}")
    for cap in caps:
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise DatasetError(f"per-class limits must be positive integers or None, got {cap!r}")
