"""Image-caption pairs and a held-out photo set that ship with Debian and PyPI packages.

No image-text data set can be downloaded here, so gnsp uses what installs offline:

- **emoji**: every symbol (`So`) glyph of Debian's `fonts-noto-color-emoji`, rendered with Pillow at
  size 109 (the font's bitmap size) on white, captioned `an emoji of <unicodedata.name, lower case>`
  (regional-indicator letters are left out: they only make sense in pairs);
- **flags**: Debian's `iso-flags-png-320x240`, captioned `the flag of <country>`, with the names from
  Debian's `iso-codes` (ISO 3166-1 common name, else its name).

`apt-get install -y fonts-noto-color-emoji iso-flags-png-320x240 iso-codes` installs all three.
**A fixed split** keeps about one pair in five out of everything that trains: a pair is held out
when the first byte of the SHA-256 of its caption is below `HELDOUT_BYTES` (51 of 256, 20 %).
The rule depends on the caption alone, so a new font or flag release moves no other pair across
the split. The `align` split aligns the default model and is the replay-free reference pool
(distillation losses, tuning's validation pairs); the `heldout` split only ever scores a model
(`gnsp_core.data.heldout`: zero-shot accuracy and image-text retrieval R@1/R@5).

The **held-out photos** are natural photos that ship in the scikit-image, scikit-learn and
matplotlib wheels. The default model's alignment never sees them, so they measure zero-shot ability
on images (and labels) it was not aligned on. See `HELDOUT_PHOTOS` for the images and their labels.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import unicodedata
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from gnsp_core.data.samples import ImageSamples, Task
from gnsp_core.errors import DatasetError

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FLAGS_DIR = Path("/usr/share/iso-flags-png-320x240")
ISO_3166 = Path("/usr/share/iso-codes/json/iso_3166-1.json")
INSTALL_HINT = "apt-get install -y fonts-noto-color-emoji iso-flags-png-320x240 iso-codes"
EMOJI_SIZE = 109
EMOJI_CANVAS = 160
# Flags in the package that are not ISO 3166-1 countries, named by hand; others (e.g. `zz`) are skipped.
EXTRA_FLAG_NAMES = {
    "_basque": "the Basque Country", "_catalonia": "Catalonia", "_galicia": "Galicia",
    "_scotland": "Scotland", "_wales": "Wales", "_united_nations": "the United Nations",
    "_olympic": "the Olympic Games", "_earth_pernefeldt": "the Earth", "eu": "the European Union",
    "eo": "Esperanto",
}

HELDOUT_BYTES = 51
"""A pair is held out when sha256(caption)[0] < HELDOUT_BYTES: 51/256 ≈ 20 % of the pairs."""
SPLITS = ("align", "heldout", "all")

ImageSource = Union[Image.Image, Callable[[], Image.Image]]


class CaptionPairs(Dataset):
    """(image, caption) pairs; images are PIL images or zero-argument loaders (loaded lazily).

    `__getitem__` returns `(transform(RGB image), caption)`, or the PIL image without a transform.
    """

    def __init__(self, images: Sequence[ImageSource], captions: Sequence[str], transform: Callable | None = None):
        if len(images) != len(captions):
            raise DatasetError(f"{len(images)} images but {len(captions)} captions")
        self.images = list(images)
        self.captions = list(captions)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, index: int) -> Image.Image:
        source = self.images[index]
        image = source if isinstance(source, Image.Image) else source()
        return image.convert("RGB")

    def __getitem__(self, index: int):
        image = self.image(index)
        return (self.transform(image) if self.transform else image), self.captions[index]

    def with_transform(self, transform: Callable | None) -> "CaptionPairs":
        """The same pairs with another image transform (the images are shared, not copied)."""
        return CaptionPairs(self.images, self.captions, transform)

    def subset(self, indices: Sequence[int]) -> "CaptionPairs":
        return CaptionPairs([self.images[i] for i in indices], [self.captions[i] for i in indices], self.transform)


def _require(path: Path) -> Path:
    if not path.exists():
        raise DatasetError(f"{path} is missing; install the reference data with: {INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=1)
def _emoji_font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_require(EMOJI_FONT)), EMOJI_SIZE)


def render_emoji(char: str) -> Image.Image:
    """One emoji, centred on a white square canvas, in colour (the font's embedded bitmaps)."""
    font = _emoji_font()
    canvas = Image.new("RGB", (EMOJI_CANVAS, EMOJI_CANVAS), "white")
    left, top, right, bottom = font.getbbox(char)
    origin = ((EMOJI_CANVAS - (right - left)) // 2 - left, (EMOJI_CANVAS - (bottom - top)) // 2 - top)
    ImageDraw.Draw(canvas).text(origin, char, font=font, embedded_color=True)
    return canvas


@functools.lru_cache(maxsize=1)
def emoji_characters() -> tuple[tuple[str, str], ...]:
    """(character, name) for every named symbol glyph of the font, by code point."""
    from fontTools.ttLib import TTFont

    cmap = TTFont(str(_require(EMOJI_FONT)), lazy=True)["cmap"].getBestCmap()
    chars = []
    for code in sorted(cmap):
        char = chr(code)
        name = unicodedata.name(char, "")
        if name and unicodedata.category(char) == "So" and not name.startswith("REGIONAL INDICATOR"):
            chars.append((char, name.lower()))
    return tuple(chars)


def emoji_pairs() -> CaptionPairs:
    chars = emoji_characters()
    return CaptionPairs([functools.partial(render_emoji, c) for c, _ in chars],
                        [f"an emoji of {name}" for _, name in chars])


def _load_png(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def flag_names() -> dict[str, str]:
    """File stem -> country (or region) name for every flag that has one."""
    entries = json.loads(_require(ISO_3166).read_text(encoding="utf-8"))["3166-1"]
    names = {e["alpha_2"].lower(): e.get("common_name", e["name"]) for e in entries}
    return {**names, **EXTRA_FLAG_NAMES}


def flag_pairs() -> CaptionPairs:
    names = flag_names()
    files = sorted(p for p in _require(FLAGS_DIR).glob("*.png") if p.stem in names)
    return CaptionPairs([functools.partial(_load_png, str(p)) for p in files],
                        [f"the flag of {names[p.stem]}" for p in files])


def is_heldout_caption(caption: str) -> bool:
    """Whether the pair with this caption is in the held-out split (see the module docstring)."""
    return hashlib.sha256(caption.encode("utf-8")).digest()[0] < HELDOUT_BYTES


def load_reference_pairs(kind: str = "emoji+flags", limit: int | None = None, seed: int = 0,
                         split: str = "align") -> CaptionPairs:
    """Pairs of `emoji`, `flags` or `emoji+flags` in one split, optionally a seeded random subset.

    `split` is `align` (the default: what the default model is aligned on and methods distil on),
    `heldout` (only ever scored) or `all`. The order is fixed (emoji by code point, then flags by
    file name), so a seed gives the same subset on every machine with the same packages.
    """
    parts = {"emoji": emoji_pairs, "flags": flag_pairs}
    names = kind.split("+")
    if not names or any(n not in parts for n in names):
        raise DatasetError(f"unknown reference data {kind!r}; use 'emoji', 'flags' or 'emoji+flags'")
    if split not in SPLITS:
        raise DatasetError(f"unknown reference split {split!r}; use one of {', '.join(SPLITS)}")
    loaded = [parts[n]() for n in names]
    pairs = CaptionPairs([i for p in loaded for i in p.images], [c for p in loaded for c in p.captions])
    if split != "all":
        keep = [i for i, c in enumerate(pairs.captions) if is_heldout_caption(c) == (split == "heldout")]
        pairs = pairs.subset(keep)
    if limit is not None and limit < len(pairs):
        pairs = pairs.subset(sorted(random.Random(seed).sample(range(len(pairs)), limit)))
    return pairs


# --- held-out zero-shot evaluation photos -------------------------------------------------------

# (source, name, label). One natural photo per label; none is used by any alignment or task.
HELDOUT_PHOTOS: tuple[tuple[str, str, str], ...] = (
    ("skimage", "astronaut", "astronaut"),
    ("skimage", "camera", "photographer"),
    ("skimage", "chelsea", "cat"),
    ("skimage", "coffee", "cup of coffee"),
    ("skimage", "coins", "coins"),
    ("skimage", "horse", "horse"),
    ("skimage", "moon", "moon"),
    ("skimage", "page", "page of text"),
    ("skimage", "rocket", "rocket"),
    ("skimage", "brick", "brick wall"),
    ("skimage", "grass", "grass"),
    ("skimage", "gravel", "gravel"),
    ("skimage", "hubble_deep_field", "galaxies"),
    ("skimage", "stereo_motorcycle", "motorcycle"),
    ("skimage", "clock", "clock"),
    ("skimage", "retina", "retina"),
    ("skimage", "immunohistochemistry", "stained tissue"),
    ("skimage", "cell", "cell"),
    ("sklearn", "china.jpg", "pagoda"),
    ("sklearn", "flower.jpg", "flower"),
    ("matplotlib", "grace_hopper.jpg", "military officer"),
)


def _heldout_image(source: str, name: str) -> Image.Image:
    if source == "skimage":
        import skimage.data

        array = getattr(skimage.data, name)()
        array = array[0] if isinstance(array, tuple) else array  # stereo_motorcycle: left view
    elif source == "sklearn":
        from sklearn.datasets import load_sample_image

        array = load_sample_image(name)
    else:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(name) as handle:
            return Image.open(handle).convert("RGB")
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return Image.fromarray(array).convert("RGB")


def heldout_eval_samples() -> tuple[list[Image.Image], list[int], list[str]]:
    """(images, labels, classnames) of the held-out photos; chance is 1 / len(classnames)."""
    classnames = sorted({label for _, _, label in HELDOUT_PHOTOS})
    images = [_heldout_image(source, name) for source, name, _ in HELDOUT_PHOTOS]
    labels = [classnames.index(label) for _, _, label in HELDOUT_PHOTOS]
    return images, labels, classnames


def load_heldout_task(transform: Callable | None = None) -> Task:
    """The held-out photos as a `gnsp_core.data.samples.Task` named `heldout` (test split only)."""
    images, labels, classnames = heldout_eval_samples()
    return Task("heldout", classnames, ImageSamples([], [], transform), ImageSamples(images, labels, transform))
