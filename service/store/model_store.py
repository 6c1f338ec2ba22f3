"""The versioned model store: a local directory, or any filesystem pyarrow.fs knows (file://, s3://, gs://).

Layout under the root:

    models/v000001/          an immutable version: claim.json (who claimed the number, under which
                             lease token), weights.safetensors, extras.safetensors, state.json
                             (spec, history), manifest.json, and on a local disk
                             stats/<sha256>.safetensors as hard links to the blobs
    blobs/<sha256>.safetensors   projector statistics, content-addressed: stored once however
                             many versions use them (a version's manifest lists its `shared`)
    active.json              the pointer to the active version, with its history
    lease/<token>.json       the writer lease (service/store/lease.py)
    jobs/<task_id>.json      one record per job
    uploads/<task_id>/       the uploaded dataset, kept until its job ends
    runs/<task_id>/          Ray Train run storage (checkpoints) while the job runs

Crash safety without locks or renames of folders (object stores have neither): a version exists
only once its `manifest.json` is written, and that file is written last; every JSON file is
replaced atomically (service/store/objects.py: one PUT on an object store, temp file + rename
with fsyncs on a local disk, where new folders are fsynced too). So a crash at any moment leaves
complete versions, an intact pointer, and at worst a version folder without a manifest, which
readers ignore and `discard_incomplete` removes once the lease that claimed it has expired.

One writer at a time: the job runner holds the store's lease (service/store/lease.py) and every
write of a version, the pointer or a job record first checks it (the fencing token). A version
number is claimed with an exclusive create of its `claim.json` (O_EXCL, or `If-None-Match: *`
on S3), so two writers never get the same number, even in the instant one takes over from the
other. Any number of processes may read.

Versions share statistics: a state's `stats/` files are named by their content's hash, so a map
whose statistics did not change since the parent (every map, after a task of a method other
than GNSP) is uploaded once, as a blob. Blobs live outside every version folder and are never
removed while a committed version's manifest names them, so a version stays readable alone
whatever happens to its parent's folder; on a local disk its folder is complete by itself (hard
links). Versions are immutable; the store has no operation that deletes a committed one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from gnsp_core.atomic_files import fsync_dir, fsync_file
from service.errors import ServiceFault, UnknownVersionError
from service.store.objects import SmallObjects, make_dirs_durable, parse_json_whole

if TYPE_CHECKING:
    from service.store.lease import StoreLease

MANIFEST = "manifest.json"
CLAIM = "claim.json"
ACTIVE = "active.json"
STATE_FILES = ("weights.safetensors", "extras.safetensors", "state.json")
SHARED_DIR = "stats"
"""A state's folder of content-addressed files (their names are their hashes), kept once as blobs."""
BLOBS = "blobs"
_VERSION_DIR = re.compile(r"^v(\d{6})$")
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_POINTER_HISTORY = 1000


def version_dir(version: int) -> str:
    return f"models/v{version:06d}"


class ModelStore:
    """Versions, the active pointer, job records and uploads under one root of one filesystem."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, uri: str | None = None) -> None:
        self.fs = filesystem
        self.root = root.rstrip("/")
        self.uri = uri or root
        self._local = _local_base(filesystem, self.root)
        self._objects = SmallObjects(filesystem, self.uri)
        self.lease: StoreLease | None = None
        """Set on the writer: every write of a version, the pointer or a job record checks it first."""

    @classmethod
    def open(cls, location: str) -> "ModelStore":
        """A store from a local path (made absolute) or a pyarrow.fs URI; the root is created if missing."""
        if "://" not in location:
            location = str(Path(location).expanduser().resolve())
        try:
            filesystem, root = pafs.FileSystem.from_uri(location)
            store = cls(filesystem, root, location)
            filesystem.create_dir(root, recursive=True)
        except (OSError, ValueError, TypeError) as exc:
            raise ServiceFault(f"cannot open the model store {location!r}: {exc}") from exc
        return store

    # --- paths -----------------------------------------------------------------------------------

    def path(self, rel: str) -> str:
        if not rel:
            return self.root
        return f"{self.root}/{rel}" if self.root else rel

    def local_path(self, rel: str = "") -> Path | None:
        """The path on this machine's disk, when the store is on local disk (None for remote stores)."""
        return None if self._local is None else self._local / rel

    def run_storage(self) -> str:
        """Where Ray Train keeps checkpoints, inside the store so a restarted service resumes from them."""
        local = self.local_path("runs")
        return str(local) if local is not None else f"{self.uri.rstrip('/')}/runs"

    # --- low-level I/O ---------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_json(self, rel: str) -> dict[str, Any] | None:
        """The JSON object at `rel`, or None if it does not exist (never a torn one: parse_json_whole)."""
        return parse_json_whole(lambda: self._read_bytes(rel))

    def _read_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def fence(self) -> None:
        """Raise LeaseLost when a lease is attached and this service no longer holds it."""
        if self.lease is not None:
            self.lease.check()

    def write_json(self, rel: str, data: dict[str, Any]) -> None:
        """Replace `rel` atomically (readers see the old file or the new one, never a torn one), fenced."""
        self.fence()
        self.put_json_unfenced(rel, data)

    def put_json_unfenced(self, rel: str, data: dict[str, Any] | bytes) -> None:
        """`write_json` without the lease check: for the lease's own records."""
        payload = data if isinstance(data, bytes) else json.dumps(data, indent=2, sort_keys=True).encode()
        self._objects.put(self.path(rel), payload, self.local_path(rel))

    def create_exclusive(self, rel: str, data: dict[str, Any] | bytes) -> bool:
        """Create `rel` only if nothing has that name (atomic on local disks and S3); False if it exists."""
        payload = data if isinstance(data, bytes) else json.dumps(data, indent=2, sort_keys=True).encode()
        return self._objects.create(self.path(rel), payload, self.local_path(rel))

    def put_file(self, local: Path, rel: str) -> None:
        """Copy a local file in (one PUT, or a multipart upload completed at once, on object stores)."""
        target = self.local_path(rel)
        if target is not None:
            make_dirs_durable(target.parent)
            shutil.copyfile(local, target)
            fsync_file(target)
            fsync_dir(target.parent)
            return
        with open(local, "rb") as src, self.fs.open_output_stream(self.path(rel)) as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)

    def get_file(self, rel: str, local: Path) -> Path:
        local.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_input_stream(self.path(rel)) as src, open(local, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        return local

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))

    def listdir(self, rel: str) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(infos, key=lambda info: info.base_name)

    # --- versions --------------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Committed versions (those with a manifest), ascending."""
        return [v for v in self._version_folders() if self.exists(f"{version_dir(v)}/{MANIFEST}")]

    def has_version(self, version: int) -> bool:
        return isinstance(version, int) and version >= 1 and self.exists(f"{version_dir(version)}/{MANIFEST}")

    def manifest(self, version: int) -> dict[str, Any]:
        data = self.read_json(f"{version_dir(version)}/{MANIFEST}") if version >= 1 else None
        if data is None:
            raise UnknownVersionError(f"model version {version} does not exist; GET /v1/models lists the versions")
        return data

    def publish_version(self, state_dir: Path, manifest: dict[str, Any]) -> int:
        """Store a ContinualState folder as the next version; the manifest is written last (the commit).

        The number is claimed first (an exclusive create of its claim); content-addressed files
        under `stats/` are uploaded as blobs only if the store lacks them.
        """
        version = self._claim_version()
        folder = version_dir(version)
        for name in STATE_FILES:
            self.fence()
            self.put_file(Path(state_dir) / name, f"{folder}/{name}")
        shared = _shared_files(Path(state_dir))
        for rel in shared:
            blob = f"{BLOBS}/{Path(rel).name}"
            if not self.exists(blob):
                self.fence()
                self._put_blob(Path(state_dir) / rel, blob)
            self._link_blob(blob, f"{folder}/{rel}")
        self.write_json(f"{folder}/{MANIFEST}", {**manifest, "version": version, "created": time.time(),
                                                 "shared": shared})
        return version

    def _claim_version(self) -> int:
        """The next free version number, taken with an exclusive create: two writers never share one."""
        version = max(self._version_folders(), default=0) + 1
        while True:
            self.fence()
            lease = self.lease
            claim = {"token": lease.token if lease else None, "holder": lease.holder if lease else None,
                     "at": time.time()}
            if self.create_exclusive(f"{version_dir(version)}/{CLAIM}", claim):
                return version
            version += 1

    def _put_blob(self, source: Path, blob: str) -> None:
        """Never a torn blob: one PUT on an object store; temp + rename (fsync'd) on a local disk."""
        target = self.local_path(blob)
        if target is None:
            self.put_file(source, blob)
            return
        tmp = f"{blob}.tmp-{uuid.uuid4().hex[:8]}"
        self.put_file(source, tmp)
        os.replace(self.local_path(tmp), target)
        fsync_dir(target.parent)

    def _link_blob(self, blob: str, rel: str) -> None:
        """On a local disk, make the version folder complete by itself with a hard link to the blob."""
        source, target = self.local_path(blob), self.local_path(rel)
        if source is None or target is None:
            return
        make_dirs_durable(target.parent)
        try:
            os.link(source, target)
        except OSError:  # a filesystem without hard links: a copy keeps the folder complete
            shutil.copyfile(source, target)
        fsync_dir(target.parent)

    def fetch_version(self, version: int, cache_dir: Path) -> Path:
        """A local folder with the version's state files (the store's own folder when it is local)."""
        manifest = self.manifest(version)  # raises UnknownVersionError for incomplete or missing versions
        local = self.local_path(version_dir(version))
        if local is not None:
            return local
        target = Path(cache_dir) / f"v{version:06d}"
        if not (target / MANIFEST).is_file():
            tmp = Path(cache_dir) / f".v{version:06d}-{uuid.uuid4().hex[:8]}"
            for name in (*STATE_FILES, MANIFEST):
                self.get_file(f"{version_dir(version)}/{name}", tmp / name)
            for rel in manifest.get("shared", []):
                self.get_file(f"{BLOBS}/{Path(rel).name}", tmp / rel)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        return target

    def blob_bytes(self) -> int:
        """Bytes the shared statistics take in the store (each blob counted once)."""
        return sum(info.size or 0 for info in self.listdir(BLOBS) if info.type == pafs.FileType.File)

    def discard_incomplete(self) -> list[str]:
        """Remove what a crashed or fenced-off writer left: version folders without a manifest whose
        claim's lease has expired (never one a live writer is publishing), blobs no committed
        version names, and stray temp files. Writer only (never while it publishes a version)."""
        self.fence()
        removed = []
        for version in self._version_folders():
            if not self.exists(f"{version_dir(version)}/{MANIFEST}") and self._stale_claim(version):
                self.delete_dir(version_dir(version))
                removed.append(version_dir(version))
        named = {Path(rel).name for v in self.versions() for rel in self.manifest(v).get("shared", [])}
        for info in self.listdir(BLOBS):
            if info.type == pafs.FileType.File and info.base_name not in named:
                self.fs.delete_file(info.path)
                removed.append(info.path)
        for rel in ("", "jobs"):
            for info in self.listdir(rel):
                if ".tmp-" in info.base_name and info.type == pafs.FileType.File:
                    self.fs.delete_file(info.path)
                    removed.append(info.path)
        return removed

    def _stale_claim(self, version: int) -> bool:
        """Whether the writer that claimed `version` can no longer commit it: no (readable) claim, or
        the claim's lease has expired (or was taken over); a claim of this writer's own lease is live."""
        try:
            claim = self.read_json(f"{version_dir(version)}/{CLAIM}")
        except ValueError:
            return True
        token = (claim or {}).get("token")
        if claim is None or token is None:
            return True
        if self.lease is not None and token == self.lease.token:
            return False
        from service.store.lease import lease_path

        try:
            record = self.read_json(lease_path(token))
        except ValueError:
            return True
        return record is None or record.get("expires", 0.0) <= time.time() or self.exists(lease_path(token + 1))

    def _version_folders(self) -> list[int]:
        found = [_VERSION_DIR.match(info.base_name) for info in self.listdir("models")
                 if info.type == pafs.FileType.Directory]
        return sorted(int(m.group(1)) for m in found if m)

    # --- the active pointer ----------------------------------------------------------------------

    def pointer(self) -> dict[str, Any]:
        return self.read_json(ACTIVE) or {"version": None, "history": []}

    def active(self) -> int | None:
        return self.pointer().get("version")

    def set_active(self, version: int, reason: str) -> dict[str, Any]:
        """Move the pointer to a committed version, recording why in its history."""
        self.manifest(version)
        self.fence()
        pointer = self.pointer()
        entry = {"version": version, "previous": pointer.get("version"), "at": time.time(), "reason": reason}
        history = [*pointer.get("history", []), entry][-MAX_POINTER_HISTORY:]
        updated = {"version": version, "updated": entry["at"], "history": history}
        self.write_json(ACTIVE, updated)
        return updated

    # --- jobs and uploads ------------------------------------------------------------------------

    def save_job(self, record: dict[str, Any]) -> None:
        self.write_json(f"jobs/{_check_job_id(record['task_id'])}.json", record)

    def jobs(self) -> list[dict[str, Any]]:
        """Every job record, in submission order."""
        records = []
        for info in self.listdir("jobs"):
            if info.base_name.endswith(".json") and ".tmp-" not in info.base_name:
                record = self.read_json(f"jobs/{info.base_name}")
                if record is not None:
                    records.append(record)
        return sorted(records, key=lambda r: (r.get("seq", 0), r.get("created", 0)))

    def put_upload(self, task_id: str, archive: Path, filename: str) -> str:
        rel = f"uploads/{_check_job_id(task_id)}/{filename}"
        self.put_file(archive, rel)
        return rel

    def fetch_upload(self, rel: str, scratch: Path) -> Path:
        local = self.local_path(rel)
        return local if local is not None else self.get_file(rel, Path(scratch) / Path(rel).name)

    def upload_ids(self) -> list[str]:
        return [info.base_name for info in self.listdir("uploads") if info.type == pafs.FileType.Directory]

    def delete_job_files(self, task_id: str) -> None:
        """Drop what a job no longer needs once it has ended: its upload and its run checkpoints."""
        for rel in (f"uploads/{_check_job_id(task_id)}", f"runs/{task_id}"):
            self.delete_dir(rel)


def _shared_files(state_dir: Path) -> list[str]:
    """The content-addressed files of a state folder, relative to it."""
    folder = state_dir / SHARED_DIR
    return sorted(f"{SHARED_DIR}/{p.name}" for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _check_job_id(task_id: str) -> str:
    if not _JOB_ID.match(task_id):
        raise ValueError(f"invalid task id {task_id!r}")
    return task_id


def _local_base(filesystem: pafs.FileSystem, root: str) -> Path | None:
    if isinstance(filesystem, pafs.LocalFileSystem):
        return Path(root)
    if isinstance(filesystem, pafs.SubTreeFileSystem) and isinstance(filesystem.base_fs, pafs.LocalFileSystem):
        return Path(filesystem.base_path) / root.lstrip("/")
    return None
