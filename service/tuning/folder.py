"""Where a search lives: a local folder (`gnsp tune --out DIR`) or a folder in the store (REST).

A search started through the API may run its driver and its trials on nodes that share no disk
with the service, and must survive the service's restart, so its records (request.json,
status.json, the trials table, the plot, best.json), its validation data, its trials' states and
its Tune experiment all live at `<store>/tune/<job_id>/`. A `SearchFolder` names that place by
address (the store's location and a folder inside it), never by a path of one node; every process
that touches it opens the store itself. `gnsp tune --out DIR` is the same thing with DIR opened
as a store of its own.

Small files are written whole (one PUT on an object store, temp file + rename on a local disk:
service/store/objects.py), and `read_json` reads again what it caught mid-rewrite, so a reader
such as `GET /v1/tune/{job_id}` never sees a torn one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from service.store import ModelStore
from service.store.objects import parse_json_whole


@functools.lru_cache(maxsize=16)
def _open(location: str) -> ModelStore:
    """One opened store per location and process (opening one on S3 is a request)."""
    return ModelStore.open(location)


@dataclass(frozen=True)
class SearchFolder:
    """A folder `rel` inside the store at `location` (a local folder or a pyarrow.fs URI)."""

    location: str
    rel: str = ""

    @classmethod
    def local(cls, folder: str | Path) -> "SearchFolder":
        return cls(str(Path(folder).expanduser().resolve()))

    @property
    def store(self) -> ModelStore:
        return _open(self.location)

    def __str__(self) -> str:
        return f"{self.location.rstrip('/')}/{self.rel}" if self.rel else self.location

    def sub(self, name: str) -> str:
        """`name` as a path relative to the store's root."""
        return f"{self.rel}/{name}" if self.rel else name

    def child(self, name: str) -> "SearchFolder":
        return SearchFolder(self.location, self.sub(name))

    @property
    def local_path(self) -> Path | None:
        """The folder on this machine's disk (None when the store is remote)."""
        return self.store.local_path(self.rel)

    def exists(self, name: str = "") -> bool:
        return self.store.exists(self.sub(name)) if name else self.store.exists(self.rel)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            with self.store.fs.open_input_stream(self.store.path(self.sub(name))) as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def read_json(self, name: str) -> Any:
        """The JSON document `name` (None when absent), never a torn one (the trials table is
        rewritten on every result while the API polls it; see parse_json_whole)."""
        return parse_json_whole(lambda: self.read_bytes(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace `name` whole (readers see the old file or the new one)."""
        self.store.put_json_unfenced(self.sub(name), data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def put_file(self, local: Path, name: str) -> None:
        self.store.put_file(local, self.sub(name))

    def delete(self, name: str = "") -> None:
        self.store.delete_dir(self.sub(name) if name else self.rel)

    def storage(self, name: str) -> tuple[str, pafs.FileSystem | None]:
        """A `storage_path` and `storage_filesystem` for Ray (Tune or Train) at `name` in this folder:
        the local path on a local store, the store's own filesystem on a remote one."""
        local = self.store.local_path(self.sub(name))
        if local is not None:
            return str(local), None
        return self.store.path(self.sub(name)), self.store.fs


def as_folder(folder: "SearchFolder | str | Path") -> SearchFolder:
    """A search folder, given as one or as a local path (`gnsp tune --out`)."""
    return folder if isinstance(folder, SearchFolder) else SearchFolder.local(folder)
