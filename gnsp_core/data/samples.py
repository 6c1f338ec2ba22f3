"""Labelled images with class names: the task type every method trains on, and per-class splits."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gnsp_core.errors import DatasetError

ImageLike = str | Path | Image.Image | np.ndarray
Transform = Callable[[Image.Image], Any]

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
"""The prompts of a task that ships none: "a photo of a {}." (the training prompt), then the 7
templates the CLIP authors selected as a small ImageNet ensemble (openai/CLIP,
Prompt_Engineering_for_ImageNet.ipynb)."""


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
    """One continual-learning task: its class names (label id = position), its two splits and its
    prompt templates."""

    name: str
    classnames: list[str]
    train: ImageSamples
    test: ImageSamples
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    """Prompt templates with `{}` for the class name: the first is the prompt the task trains on,
    all of them make the zero-shot head it is scored with (the MTIL protocol: each dataset has its
    own, see mtil_names.py). Tasks that ship none use `DEFAULT_TEMPLATES`."""

    def __post_init__(self) -> None:
        self.templates = check_templates(self.templates)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The templates as a tuple, or DatasetError unless each is a string with one `{}` and no other field."""
    if isinstance(templates, str) or not templates:
        raise DatasetError(f"templates must be a non-empty list of strings with '{{}}', got {templates!r}")
    for template in templates:
        try:
            ok = isinstance(template, str) and template.count("{}") == 1 and template.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise DatasetError(f"template {template!r} must contain '{{}}' exactly once (where the class name "
                               "goes) and no other braces, e.g. 'a photo of a {}, a type of pet.'")
    return tuple(templates)


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


def cap_task(task: Task, max_train_per_class: int | None, max_test_per_class: int | None, *, seed: int) -> Task:
    """Keep at most N items per class in each split (seeded choice); None keeps everything."""
    return dataclasses.replace(
        task,
        train=task.train.subset(per_class_subset(task.train.labels, max_train_per_class, seed)),
        test=task.test.subset(per_class_subset(task.test.labels, max_test_per_class, seed)),
    )
