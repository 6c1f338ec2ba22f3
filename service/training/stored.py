"""What a training worker reads from the store, by address: nothing crosses nodes as a local path.

A Ray Train worker may run on a node that shares no disk with the service (a GPU node of a
KubeRay cluster). So a job names its dataset and its base version by their place in the store
(`StoredUpload`, `StoredVersion`), and each worker fetches them into its own node-local scratch;
checkpoints, and with them the trained state, go back to the store through Ray Train's run
storage (`run_storage`). A local-folder store works across nodes only when every node mounts it
at the same path; an object store (s3://, gs://) needs nothing shared.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from service.store import ModelStore


@dataclass(frozen=True)
class StoredUpload:
    """A dataset archive in the store (`uploads/<task_id>/<file>`)."""

    store: str
    """The store's location, as the service settings give it (a folder or a pyarrow.fs URI)."""
    rel: str

    def fetch(self, scratch: Path) -> str:
        """The archive on this node: downloaded into `scratch` (or the store's own file on a local store)."""
        return str(ModelStore.open(self.store).fetch_upload(self.rel, scratch))


@dataclass(frozen=True)
class StoredVersion:
    """A committed model version in the store: the ContinualState a job starts from."""

    store: str
    version: int

    def fetch(self, scratch: Path) -> str:
        """The version's state folder on this node (downloaded into `scratch` from a remote store)."""
        return str(ModelStore.open(self.store).fetch_version(self.version, scratch))


@dataclass(frozen=True)
class StoredState:
    """A ContinualState folder in the store that is no version: a search trial's state after a task
    (the final checkpoint of that task's Ray Train run), which its next task starts from."""

    store: str
    rel: str

    @classmethod
    def of_checkpoint(cls, store: ModelStore, checkpoint_path: str) -> "StoredState":
        """The state a Ray Train checkpoint inside `store` holds (its path as Ray reports it)."""
        local = store.local_path()
        base = str(local) if local is not None else store.root
        if not checkpoint_path.startswith(base):
            raise ValueError(f"checkpoint {checkpoint_path} is not inside the store {store.uri}")
        return cls(store.uri, checkpoint_path[len(base):].strip("/"))

    def fetch(self, scratch: Path) -> str:
        """The state folder on this node: the store's own folder on a local store, else a download."""
        store = ModelStore.open(self.store)
        local = store.local_path(self.rel)
        if local is not None:
            return str(local)
        target = Path(scratch) / Path(self.rel).name
        pafs.copy_files(store.path(self.rel), str(target), source_filesystem=store.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return str(target)


Stored = StoredUpload | StoredVersion | StoredState


def local_source(source: str | Stored | None, scratch: Path) -> str | None:
    """A path or task source this node can read: stored things are fetched into `scratch`."""
    if isinstance(source, (StoredUpload, StoredVersion, StoredState)):
        return source.fetch(scratch)
    return source


def run_storage(store: ModelStore) -> tuple[str, pafs.FileSystem | None]:
    """Ray Train's `storage_path` and `storage_filesystem` for runs (checkpoints) inside the store.

    A remote store hands Ray its own pyarrow filesystem (endpoint, region and credentials as the
    service opened it), so workers on any node write checkpoints to the same place and a run
    restarted on a new node resumes from them."""
    local = store.local_path("runs")
    if local is not None:
        return str(local), None
    return store.path("runs"), store.fs


def frozen_outputs_folder(work_dir: str | None) -> Path:
    """Node-local: the frozen parts' outputs that jobs on this node share (every job trains in fresh
    Ray Train worker processes, and a new service's attempt host starts empty; see
    gnsp_core.frozen_outputs and gnsp_core.trunk_memo)."""
    return Path(scratch_root(work_dir) or tempfile.gettempdir()) / "gnsp-frozen-outputs"


def scratch_root(work_dir: str | None) -> str | None:
    """The node-local scratch folder, created on this node if missing (None: the system temp dir)."""
    if work_dir is None:
        return None
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return work_dir
