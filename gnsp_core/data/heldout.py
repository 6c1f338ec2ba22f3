"""The held-out zero-shot suite: several hundred images and labels the default model never saw.

Seventeen photos made one photo worth six points, too coarse to tell methods apart. The suite
gathers everything that installs offline and stays out of every alignment and training step:

| set             | images                                                          | label set               |
|-----------------|-----------------------------------------------------------------|-------------------------|
| `emoji-heldout` | the held-out split of the emoji pairs (`reference.py`, ~270)    | their names             |
| `flags-heldout` | the held-out split of the flag pairs (~50)                      | their countries         |
| `photos`        | natural photos of scikit-image, scikit-learn, matplotlib (21)   | `HELDOUT_PHOTOS` labels |
| `opencv-photos` | natural photos of Debian's `opencv-doc` samples (21), if there  | `OPENCV_PHOTOS` labels  |

Each set is scored over its own label set (the MTIL convention), emoji and flags with the one
template their captions use. The suite's accuracy is pooled over all items (each image counts
once), the number the quality gate compares. Retrieval (image->text and text->image R@1/R@5) runs
on the held-out emoji and flag caption pairs together (`heldout-pairs`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from gnsp_core.data.reference import CaptionPairs, load_heldout_task, load_reference_pairs
from gnsp_core.data.samples import ImageSamples, Task

HELDOUT = "heldout"
"""The eval-set name that stands for the whole suite (`gnsp bench --eval heldout`, the service's gate)."""
PAIRS_NAME = "heldout-pairs"
OPENCV_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_INSTALL = "apt-get install -y opencv-doc"
# (file, label): the natural photos among OpenCV's sample data (renders, paintings, calibration
# targets and synthetic pictures are left out).
OPENCV_PHOTOS: tuple[tuple[str, str], ...] = (
    ("aero1.jpg", "aerial view of a town"),
    ("aloeL.jpg", "aloe plant"),
    ("apple.jpg", "apple"),
    ("baboon.jpg", "baboon"),
    ("board.jpg", "circuit board"),
    ("building.jpg", "office building"),
    ("butterfly.jpg", "butterfly"),
    ("chicky_512.png", "dog"),
    ("ela_original.jpg", "notebook"),
    ("fruits.jpg", "citrus fruits"),
    ("graf1.png", "graffiti"),
    ("home.jpg", "palace"),
    ("left01.jpg", "chessboard"),
    ("leuvenA.jpg", "brick houses"),
    ("licenseplate_motion.jpg", "car"),
    ("messi5.jpg", "soccer player"),
    ("orange.jpg", "orange"),
    ("rubberwhale1.png", "toys"),
    ("smarties.png", "candies"),
    ("squirrel_cls.jpg", "squirrel"),
    ("sudoku.png", "sudoku puzzle"),
)


@dataclass(frozen=True)
class HeldoutSuite:
    """The held-out caption pairs, which sets are slices of them, and the photo sets.

    A pair set's label set is its captions minus `prefix`, its one template `prefix + "{}"`: its
    zero-shot head is then exactly the normalised caption embeddings, so its accuracy is read off
    the same image and caption embeddings retrieval uses (one pass over the images for both).
    """

    pairs: CaptionPairs
    pair_sets: dict[str, tuple[int, int, str]]  # name -> (start, stop, caption prefix) in `pairs`
    photo_tasks: list[Task]

    @property
    def set_names(self) -> list[str]:
        return [*self.pair_sets, *(t.name for t in self.photo_tasks)]

    @property
    def sizes(self) -> dict[str, int]:
        """Test items per set, and the number of retrieval pairs."""
        pair_sizes = {name: stop - start for name, (start, stop, _) in self.pair_sets.items()}
        return pair_sizes | {t.name: len(t.test) for t in self.photo_tasks} | {PAIRS_NAME: len(self.pairs)}

    @property
    def tasks(self) -> list[Task]:
        """Every set as a test-only task (for callers that classify through the REST API)."""
        pair_tasks = [pairs_task(name, self.pairs.subset(range(start, stop)), prefix)
                      for name, (start, stop, prefix) in self.pair_sets.items()]
        return pair_tasks + list(self.photo_tasks)


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def opencv_available() -> bool:
    return all((OPENCV_DIR / name).is_file() for name, _ in OPENCV_PHOTOS)


def load_opencv_photos() -> Task:
    """OpenCV's sample photos (Debian `opencv-doc`) as a test-only task named `opencv-photos`."""
    classnames = sorted({label for _, label in OPENCV_PHOTOS})
    images = [_load_rgb(str(OPENCV_DIR / name)) for name, _ in OPENCV_PHOTOS]
    labels = [classnames.index(label) for _, label in OPENCV_PHOTOS]
    return Task("opencv-photos", classnames, ImageSamples([], []), ImageSamples(images, labels))


def pairs_task(name: str, pairs: CaptionPairs, prefix: str) -> Task:
    """Caption pairs `<prefix><label>` as a test-only task over their own labels, template `<prefix>{}`."""
    classnames = [c[len(prefix):] for c in pairs.captions]
    if len(set(classnames)) != len(classnames):
        raise ValueError(f"{name}: captions repeat, so labels would be ambiguous")
    images = [functools.partial(pairs.image, i) for i in range(len(pairs))]
    return Task(name, classnames, ImageSamples([], []), _LazyImages(images, list(range(len(pairs)))),
                templates=(prefix + "{}",))


class _LazyImages(ImageSamples):
    """ImageSamples whose items are zero-argument image loaders (emoji render on demand)."""

    def __getitem__(self, index: int):
        image = self.images[index]().convert("RGB")
        return (image if self.transform is None else self.transform(image)), self.labels[index]

    def subset(self, indices):
        return _LazyImages([self.images[i] for i in indices], [self.labels[i] for i in indices], self.transform)


@functools.cache
def load_heldout_suite() -> HeldoutSuite:
    """The whole suite (see the module docstring); `opencv-photos` joins when `opencv-doc` is installed."""
    emoji = load_reference_pairs("emoji", split="heldout")
    flags = load_reference_pairs("flags", split="heldout")
    both = CaptionPairs(emoji.images + flags.images, emoji.captions + flags.captions)
    pair_sets = {"emoji-heldout": (0, len(emoji), "an emoji of "),
                 "flags-heldout": (len(emoji), len(both), "the flag of ")}
    photos = [_renamed(load_heldout_task(), "photos")] + ([load_opencv_photos()] if opencv_available() else [])
    return HeldoutSuite(both, pair_sets, photos)


def _renamed(task: Task, name: str) -> Task:
    return Task(name, task.classnames, task.train, task.test, task.templates)
