"""Small files that are rewritten while others may read them (records, status files, pointers).

Every such write goes through here: a temp file in the same folder, flush + fsync, `os.replace`,
then an fsync of the folder. A reader sees the old file or the new one, never a torn one, and a
crash at any moment leaves one of the two on disk. The temp name is unique per write, so two
writers racing on one path never write into each other's temp file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | Path, payload: bytes) -> None:
    """Replace `path` with `payload` atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """`write_bytes_atomic` of the JSON text of `data`."""
    write_bytes_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys).encode())


def fsync_file(path: str | Path) -> None:
    """Flush a file written by other code (a library's `save`) to disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(folder: str | Path) -> None:
    """Make renames and new entries in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
