"""A frozen image part's outputs for the reference pairs, kept in a folder between processes.

Within one process, the feature cache keeps the reference pairs' outputs of a frozen part for as
long as the reference pool lives (feature_cache.py), so a run's later tasks reuse them. Every job
of the service runs in fresh Ray Train worker processes, though, and would compute them again:
on gnsp-mini that is 1,286 reference images through the image trunk, more than the task's own
images. Saved in a node-local folder and named by everything they depend on (the frozen part's
weights, the reference pool's content and the preprocessing that renders it), they are read back
by the next job on that node, and by any later task whose frozen part has the same weights.

A pool's content is fingerprinted by its size, its captions, the preprocessing's description and
the pixels of three of its images (rendering all of them would cost what the file saves).
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from gnsp_core.atomic_files import write_bytes_atomic

log = logging.getLogger(__name__)
REFERENCE_POOL = 1
"""The pool number of reference keys (feature_cache.REFERENCE; not imported, which would be a cycle)."""


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

    def load(self, part: str, weights_digest: str) -> dict[tuple, Tensor]:
        """The saved reference rows of `part` (keys (pool, item, view) -> output); {} if none or unreadable."""
        path = self.path(part, weights_digest)
        if not path.is_file():
            return {}
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            keys, rows = saved["keys"], saved["rows"]
            if keys.ndim != 2 or keys.shape[1] != 3 or len(keys) != len(rows):
                raise ValueError(f"keys {tuple(keys.shape)} and rows {tuple(rows.shape)} do not match")
        except Exception as exc:  # a torn or foreign file costs a recomputation, never a wrong row
            log.warning("ignoring saved frozen outputs %s: %s", path, exc)
            return {}
        return {tuple(key): row for key, row in zip(keys.tolist(), rows)}

    def save(self, part: str, weights_digest: str, rows: dict[tuple, Tensor]) -> None:
        """Save the reference rows of `rows` (atomically: a reader sees the old file or the new one)."""
        reference = {key: row for key, row in rows.items() if key[0] == REFERENCE_POOL}
        if not self.writable or not reference:
            return
        keys = sorted(reference)
        buffer = io.BytesIO()
        torch.save({"keys": torch.tensor(keys, dtype=torch.int64),
                    "rows": torch.stack([reference[k].detach().to("cpu") for k in keys])}, buffer)
        write_bytes_atomic(self.path(part, weights_digest), buffer.getvalue())
