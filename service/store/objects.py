"""The two writes the store's safety rests on, done right on a local disk and on an object store.

- `put_bytes`: replace a small object whole. On an object store that is ONE PUT (an object store
  makes a PUT visible whole or not at all; a temp object plus a "move" would be a copy and a
  delete there, two more requests and a window where both exist). On a local disk: temp file,
  fsync, rename, fsync of the folder.
- `ExclusiveCreate`: create an object only if no object has that name, atomically, so two
  writers racing for one name (a version number, a lease token) get one winner. On a local disk
  `O_CREAT|O_EXCL`; on S3 (and S3-compatible stores such as SeaweedFS or MinIO) a conditional PUT
  with `If-None-Match: *`, which pyarrow cannot send, so it goes through botocore with the same
  endpoint, region and credentials (the standard AWS variables) pyarrow uses. Other pyarrow
  filesystems get a check-then-write, which is NOT atomic between processes.

New local folders are made durable: after each `mkdir` its parent folder is fsynced, so a crash
cannot lose a folder whose files were fsynced.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pyarrow.fs as pafs

from gnsp_core.atomic_files import fsync_dir, write_bytes_atomic


def make_dirs_durable(folder: Path) -> None:
    """`mkdir -p` that fsyncs the parent of every folder it creates."""
    missing = []
    probe = Path(folder)
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for created in reversed(missing):
        try:
            created.mkdir()
        except FileExistsError:
            continue
        fsync_dir(created.parent)


def put_bytes(fs: pafs.FileSystem, path: str, payload: bytes, local: Path | None) -> None:
    """Replace one object whole: a single PUT on an object store, temp + rename on a local disk."""
    if local is not None:
        make_dirs_durable(local.parent)
        write_bytes_atomic(local, payload)
        return
    with fs.open_output_stream(path) as stream:
        stream.write(payload)


def create_local_exclusive(path: Path, payload: bytes) -> bool:
    """O_EXCL create, fsync'd with its folder; False when the file already exists."""
    make_dirs_durable(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(path.parent)
    return True


class ExclusiveCreate:
    """Create-if-absent on the store's filesystem (see the module docstring for how, per filesystem)."""

    def __init__(self, fs: pafs.FileSystem, uri: str, local_base: Path | None) -> None:
        self.fs, self.local_base = fs, local_base
        self._s3 = _S3Conditional(fs, uri) if isinstance(fs, pafs.S3FileSystem) else None

    @property
    def atomic(self) -> bool:
        return self.local_base is not None or self._s3 is not None

    def __call__(self, path: str, payload: bytes, local: Path | None) -> bool:
        if local is not None:
            return create_local_exclusive(local, payload)
        if self._s3 is not None:
            return self._s3.create(path, payload)
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            return False
        put_bytes(self.fs, path, payload, None)
        return True


class _S3Conditional:
    """`PUT ... If-None-Match: *` through botocore, configured like the pyarrow filesystem."""

    def __init__(self, fs: pafs.S3FileSystem, uri: str) -> None:
        query = {k: v[-1] for k, v in parse_qs(urlparse(uri).query).items()}
        endpoint = query.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") \
            or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        self.endpoint, self.region = endpoint, query.get("region") or fs.region or None
        self.keys = (query.get("access_key"), query.get("secret_key"))
        self._client = None

    def client(self):
        if self._client is None:
            import botocore.config
            import botocore.session

            config = botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3})
            self._client = botocore.session.get_session().create_client(
                "s3", endpoint_url=self.endpoint, region_name=self.region, config=config,
                aws_access_key_id=self.keys[0], aws_secret_access_key=self.keys[1])
        return self._client

    def create(self, path: str, payload: bytes) -> bool:
        from botocore.exceptions import ClientError

        bucket, _, key = path.partition("/")
        try:
            self.client().put_object(Bucket=bucket, Key=key, Body=payload, IfNoneMatch="*")
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412):  # exists (412), or a concurrent conditional write won (409)
                return False
            raise OSError(f"conditional create of s3://{path} failed: {exc}") from exc
        return True
