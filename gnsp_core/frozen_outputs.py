"""A frozen part's outputs for the reference pairs, kept in a folder between processes.

Within one process, the feature cache keeps the reference pairs' outputs of a frozen part for as
long as the reference pool lives (feature_cache.py), so a run's later tasks reuse them. Every job
of the service runs in fresh Ray Train worker processes, though, and would compute them again:
on gnsp-mini that is 1,286 reference images through the image trunk and as many captions through
the text trunk, more than the task's own inputs. Saved in a node-local folder and named by
everything they depend on (the frozen part's weights, the reference pool's content and the
preprocessing that renders it), they are read back by the next job on that node, and by any later
task whose frozen part has the same weights.

Image rows are keyed `(pool, item, view)` and only the reference pool's are saved. Text rows are
keyed by their token ids (the captions, and the few class prompts of each task): all of them are
saved, up to `len(pool) + EXTRA_TEXT_ROWS` (a file is bounded however many tasks passed by).

A pool's content is fingerprinted by its size, its captions, the preprocessing's description and
the pixels of three of its images (rendering all of them would cost what the file saves).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from gnsp_core.row_files import Row, read_rows, write_rows

REFERENCE_POOL = 1
"""The pool number of reference keys (feature_cache.REFERENCE; not imported, which would be a cycle)."""
EXTRA_TEXT_ROWS = 2048
"""Text rows a file keeps beyond one per reference pair (class prompts of the tasks seen)."""


def pool_fingerprint(pool: Dataset, preprocess: Callable) -> str:
    """What a reference pool's rendered images depend on, hashed (see the module's docstring)."""
    digest = hashlib.sha1()
    size = len(pool)
    digest.update(f"{size}|{preprocess!r}".encode())
    for caption in getattr(pool, "captions", []):
        digest.update(caption.encode() + b"\0")
    for item in sorted({0, size // 2, size - 1}) if size else []:
        image = pool[item][0]
        pixels = preprocess(image) if not isinstance(image, Tensor) else image
        digest.update(pixels.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def savable(part: str, keys: Any) -> bool:
    """Whether a memo's rows can be kept on file: image keys, and text keys that are token ids alone
    (open_clip's own text towers key their rows with call flags too; those stay in memory)."""
    if part.startswith("image:"):
        return True
    return len({len(k) for k in keys}) == 1 and all(all(isinstance(i, int) for i in k) for k in keys)


class FrozenOutputFiles:
    """One folder of saved outputs, for one reference pool rendered by one preprocessing."""

    def __init__(self, folder: str | Path, pool: Dataset, preprocess: Callable, writable: bool = True) -> None:
        self.folder, self.pool, self.preprocess, self.writable = Path(folder), pool, preprocess, writable
        self._fingerprint: str | None = None

    def path(self, part: str, weights_digest: str) -> Path:
        if self._fingerprint is None:
            self._fingerprint = pool_fingerprint(self.pool, self.preprocess)
        name = part.replace(":", "-").replace("/", "-")
        return self.folder / f"{name}-{weights_digest[:20]}-{self._fingerprint[:20]}.pt"

    def load(self, part: str, weights_digest: str) -> dict[tuple, Row]:
        """The saved rows of `part` (key -> output); {} if none or unreadable."""
        keys, rows = read_rows(self.path(part, weights_digest), "frozen outputs")
        return {tuple(key): row for key, row in zip(keys, rows)}

    def save(self, part: str, weights_digest: str, rows: dict[tuple, Row]) -> None:
        """Save what `part`'s memo holds that is worth keeping (see the module's docstring),
        atomically: a reader sees the old file or the new one."""
        kept = self._kept(part, rows)
        if not self.writable or not kept or not savable(part, kept):
            return
        keys = list(kept)
        write_rows(self.path(part, weights_digest), torch.tensor(keys, dtype=torch.int64), [kept[k] for k in keys])

    def _kept(self, part: str, rows: dict[tuple, Row]) -> dict[tuple, Row]:
        if part.startswith("image:"):
            return {key: row for key, row in sorted(rows.items()) if key[0] == REFERENCE_POOL}
        limit = len(self.pool) + EXTRA_TEXT_ROWS
        return dict(list(rows.items())[:limit])  # insertion order: rows read from the file come first
