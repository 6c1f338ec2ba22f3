"""The two writes the store's safety rests on, done right on a local disk and on an object store.

- `put`: replace a small object (a record, the pointer) whole. On S3 that is ONE PutObject (S3
  makes a PUT visible whole or not at all; a temp object plus a "move" would be a copy and a
  delete there, two more requests and a window where both exist; and pyarrow's output stream
  sends even a few bytes as a three-request multipart upload). On a local disk: temp file,
  fsync, rename, fsync of the folder.
- `create`: create an object only if no object has that name, atomically, so two writers racing
  for one name (a version number, a lease token) get one winner. On a local disk
  `O_CREAT|O_EXCL`; on S3 (and S3-compatible stores such as SeaweedFS or MinIO) a conditional PUT
  with `If-None-Match: *`.

pyarrow can send neither a single PutObject nor a conditional one, so on S3 both go through
botocore, with the endpoint, region and credentials pyarrow uses (the standard AWS variables, or
the URI's `endpoint_override`/`region` options). Other pyarrow filesystems get pyarrow's stream
and a check-then-write `create`, which is NOT atomic between processes.

New local folders are made durable: after each `mkdir` its parent folder is fsynced, so a crash
cannot lose a folder whose files were fsynced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

import pyarrow.fs as pafs

from gnsp_core.atomic_files import fsync_dir, write_bytes_atomic


TORN_READ_ATTEMPTS = 5
"""Reads of a JSON file before its JSON is taken as broken rather than caught mid-rewrite."""


def parse_json_whole(read: Callable[[], bytes | None]) -> Any:
    """The JSON document `read` returns (None when it returns None), read again when it does not
    parse. pyarrow's S3 reader sizes an object when it opens it and fetches its bytes after, so an
    object replaced in between (one PutObject: a record rewritten while a client polls it) reads
    torn; the next read sees the new object whole."""
    for attempt in range(TORN_READ_ATTEMPTS):
        data = read()
        try:
            return None if data is None else json.loads(data)
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError on the bytes a torn read leaves
            if attempt == TORN_READ_ATTEMPTS - 1:
                raise


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


class SmallObjects:
    """Whole-object writes of small payloads on the store's filesystem (see the module docstring)."""

    def __init__(self, fs: pafs.FileSystem, uri: str) -> None:
        self.fs = fs
        self._s3 = _S3Puts(fs, uri) if isinstance(fs, pafs.S3FileSystem) else None

    def put(self, path: str, payload: bytes, local: Path | None) -> None:
        """Replace one object whole: one PUT on S3, temp + rename (fsync'd) on a local disk."""
        if local is not None:
            make_dirs_durable(local.parent)
            write_bytes_atomic(local, payload)
        elif self._s3 is not None:
            self._s3.put(path, payload)
        else:
            with self.fs.open_output_stream(path) as stream:
                stream.write(payload)

    def create(self, path: str, payload: bytes, local: Path | None) -> bool:
        """Create-if-absent; False when an object of that name exists."""
        if local is not None:
            return create_local_exclusive(local, payload)
        if self._s3 is not None:
            return self._s3.put(path, payload, exclusive=True)
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            return False
        self.put(path, payload, None)
        return True


class _S3Puts:
    """PutObject (plain, or with `If-None-Match: *`) through botocore, configured like pyarrow's filesystem."""

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

    def put(self, path: str, payload: bytes, exclusive: bool = False) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, key = path.partition("/")
        condition = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self.client().put_object(Bucket=bucket, Key=key, Body=payload, **condition)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if exclusive and status in (409, 412):  # exists (412), or a concurrent conditional write won (409)
                return False
            raise OSError(f"PUT s3://{path} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise OSError(f"PUT s3://{path} failed: {exc}") from exc
        return True
