"""The published GNSP reference pool: N ImageNet training images captioned "a photo of a {class}.".

GNSP's CD and MAP losses distil on image-caption pairs of no task. The paper draws them from
ImageNet's training set: 1,000 images, picked as `torch.utils.data.random_split` picks them with
seed 42 over the ImageFolder file order, and the same images serve every task (the official code
re-seeds each time). `imagenet_pairs` does exactly that on an ImageNet-layout folder:

    root/n01440764/*.JPEG ... root/n15075141/*.JPEG     WordNet ids (ImageNet's train/ folder)
    root/tench/*.jpg ... root/toilet_tissue/*.jpg        or plain class-name folders (`_` = space)

WordNet-id folders are named with CLIP's ImageNet class names (open_clip's `IMAGENET_CLASSNAMES`,
matched through the 1,000 synsets in ImageNet's sorted order, as timm ships them), so a folder
holding only some of the classes is named correctly too. As a reference spec (the CLI's
`--reference`, the service's `reference` setting): `imagenet:<folder>`, or `imagenet:<folder>#N`
for another number of images.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch
from PIL import Image

from gnsp_core.data.reference import CaptionPairs
from gnsp_core.errors import DatasetError

SPEC_PREFIX = "imagenet:"
CAPTION = "a photo of a {}."
DEFAULT_IMAGES = 1000
DEFAULT_SEED = 42
_WNID = re.compile(r"^n\d{8}$")
_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


@functools.lru_cache(maxsize=1)
def wnid_classnames() -> dict[str, str]:
    """WordNet id -> CLIP's class name for the 1,000 ImageNet-1k classes."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo("imagenet-1k").label_names()
    return dict(zip(synsets, IMAGENET_CLASSNAMES, strict=True))


def class_folders(root: Path) -> list[tuple[str, str]]:
    """(folder, class name) for each class folder, in sorted (ImageFolder) order."""
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise DatasetError(f"{root} has no class folders; point it at ImageNet's train/ folder "
                           "(n01440764/, n01443537/, ...) or at a folder of class-name folders")
    wnids = [f for f in folders if _WNID.match(f)]
    if not wnids:
        return [(f, f.replace("_", " ").strip()) for f in folders]
    names = wnid_classnames()
    unknown = sorted(set(folders) - set(names))
    if unknown:
        raise DatasetError(f"{root} mixes WordNet-id folders with others, or has ids outside ImageNet-1k: "
                           f"{unknown[:5]}; use one kind of folder name")
    return [(f, names[f]) for f in folders]


def _image_files(folder: Path) -> list[str]:
    """Image files under a class folder in torchvision ImageFolder's order (sorted walk, sorted names)."""
    files = []
    for dirpath, _, names in sorted(os.walk(folder, followlinks=True)):
        files += [os.path.join(dirpath, n) for n in sorted(names) if n.lower().endswith(_SUFFIXES)]
    return files


def _load_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def imagenet_pairs(root: str | Path, count: int = DEFAULT_IMAGES, seed: int = DEFAULT_SEED) -> CaptionPairs:
    """`count` seeded images of an ImageNet-layout folder (all of them if it holds fewer), each
    captioned "a photo of a {class}."; images load lazily. The choice is the first `count` of
    `torch.randperm(n, generator=seed)` over the ImageFolder order, as random_split makes it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"ImageNet reference folder {root} does not exist")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise DatasetError(f"the number of ImageNet reference images must be a positive integer, got {count!r}")
    files, captions = [], []
    for folder, name in class_folders(root):
        found = _image_files(root / folder)
        files += found
        captions += [CAPTION.format(name)] * len(found)
    if not files:
        raise DatasetError(f"{root} has class folders but no images in them")
    chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return CaptionPairs([functools.partial(_load_image, files[i]) for i in chosen], [captions[i] for i in chosen])


def parse_spec(spec: str) -> tuple[str, int]:
    """`imagenet:<folder>[#N]` -> (folder, N)."""
    if not spec.startswith(SPEC_PREFIX) or not spec[len(SPEC_PREFIX):]:
        raise DatasetError(f"{spec!r} is not an ImageNet reference; write imagenet:<folder> or imagenet:<folder>#N")
    body = spec[len(SPEC_PREFIX):]
    folder, sep, count = body.rpartition("#")
    if sep and count.isdigit() and folder:
        return folder, int(count)
    return body, DEFAULT_IMAGES


def imagenet_reference(spec: str) -> CaptionPairs:
    """The reference pairs an `imagenet:<folder>[#N]` spec names."""
    folder, count = parse_spec(spec)
    return imagenet_pairs(folder, count)
