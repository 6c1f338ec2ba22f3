"""Safe extraction of uploaded dataset archives (.zip, .tar, .tar.gz/.tgz).

Uploads come from users over HTTP, so an archive is untrusted: every entry name is checked for
path escapes, links and device files are refused, and sizes are bounded twice, once from what
the archive declares (before anything is written) and once by counting the bytes actually
decompressed (a lying header cannot get past the second check). Every entry counts toward the
entry limit, folders included (100,000 empty folders are as costly to create as files), and a
zip's declared entry count and central directory size are checked from its end record before the
directory itself is parsed; a tar's members are counted as they are read. The type is detected
from the content, not the file name.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from gnsp_core.errors import ArchiveTypeError, DatasetError

_CHUNK = 1 << 20
CENTRAL_DIRECTORY_BYTES_PER_ENTRY = 512
"""A zip's central directory may hold this many bytes per allowed entry (46 bytes of record plus a
name and extras: a 20,000-image dataset with 100-character paths needs about 3 MB of the 10 MB)."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what an uploaded dataset may contain."""

    max_files: int = 20_000
    """Entries (files and folders) an archive may hold; images in a dataset folder."""
    max_total_bytes: int = 2 * 1024**3
    max_file_bytes: int = 50 * 1024**2
    max_image_pixels: int = 40_000_000


def _safe_relpath(name: str) -> PurePosixPath:
    """The entry's path relative to the destination, or DatasetError if it could escape it."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise DatasetError(f"archive entry {name!r} has an absolute path; archive the folder with relative paths")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DatasetError(f"archive entry {name!r} contains '..'; archive the folder with plain relative paths")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


class _Budget:
    """Running entry count (files and folders) and byte total, checked against the limits."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.entries = 0
        self.files = 0
        self.total = 0

    def entry(self, name: str, size: int) -> None:
        """Count one entry (a file or a folder) with its size (declared in pass 1, 0 in pass 2 where
        bytes are counted)."""
        self.entries += 1
        if self.entries > self.limits.max_files:
            raise DatasetError(f"archive has more than {self.limits.max_files} entries (files and folders); "
                               "split the dataset or drop images")
        self.data(name, size, size)

    def data(self, name: str, n: int, file_bytes: int) -> None:
        """Count `n` more bytes, `file_bytes` so far in entry `name`."""
        self.total += n
        if file_bytes > self.limits.max_file_bytes:
            raise DatasetError(
                f"archive entry {name!r} is larger than {self.limits.max_file_bytes} bytes; shrink or remove it"
            )
        if self.total > self.limits.max_total_bytes:
            raise DatasetError(
                f"archive unpacks to more than {self.limits.max_total_bytes} bytes; upload a smaller dataset"
            )


def _copy_counted(src: IO[bytes], dest: Path, name: str, budget: _Budget) -> None:
    """Copy one entry, counting real bytes so a lying size header cannot exhaust the disk."""
    budget.entry(name, 0)
    budget.files += 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        out = open(dest, "xb")
    except FileExistsError:
        raise DatasetError(f"archive entry {name!r} appears twice; remove the duplicate") from None
    written = 0
    with out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            budget.data(name, len(chunk), written)
            out.write(chunk)


def _check_zip(zf: zipfile.ZipFile, limits: ArchiveLimits) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    budget = _Budget(limits)
    entries = []
    for info in zf.infolist():
        rel = _safe_relpath(info.filename)
        ftype = stat.S_IFMT(info.external_attr >> 16)  # unix file type; 0 when the tool wrote none
        if info.create_system == 3 and ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
            kind = "a symlink" if ftype == stat.S_IFLNK else "a special file"
            raise DatasetError(f"archive entry {info.filename!r} is {kind}; only regular files are allowed")
        if info.flag_bits & 0x1:
            raise DatasetError(f"archive entry {info.filename!r} is encrypted; upload an archive without a password")
        budget.entry(info.filename, 0 if info.is_dir() else info.file_size)
        entries.append((info, rel))
    return entries


def check_zip_directory(archive: Path, limits: ArchiveLimits) -> None:
    """Refuse a zip whose end record declares more entries, or a larger central directory, than the
    limits allow, before zipfile parses that directory (it builds one object per entry)."""
    with open(archive, "rb") as handle:
        # zipfile's own reader of the end record (zip64 included); ZipFile() offers no step between
        # reading it and parsing the whole central directory.
        end = zipfile._EndRecData(handle)  # noqa: SLF001
    if end is None:
        raise DatasetError(f"{archive.name} has no zip end record (truncated or corrupt); re-create the archive")
    entries, directory_bytes = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # noqa: SLF001
    if entries > limits.max_files:
        raise DatasetError(f"archive declares {entries} entries (files and folders), more than the limit of "
                           f"{limits.max_files}; split the dataset or drop images")
    if directory_bytes > limits.max_files * CENTRAL_DIRECTORY_BYTES_PER_ENTRY:
        raise DatasetError(f"archive's central directory is {directory_bytes} bytes, more than "
                           f"{limits.max_files * CENTRAL_DIRECTORY_BYTES_PER_ENTRY}; shorten the entry names "
                           "and drop comments and extra fields")


def _extract_zip(archive: Path, dest: Path, limits: ArchiveLimits) -> int:
    check_zip_directory(archive, limits)
    with zipfile.ZipFile(archive) as zf:
        entries = _check_zip(zf, limits)
        budget = _Budget(limits)
        for info, rel in entries:
            if info.is_dir():
                budget.entry(info.filename, 0)
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as src:
                _copy_counted(src, dest / rel, info.filename, budget)
        return budget.files


def _tar_members(tf: tarfile.TarFile, limits: ArchiveLimits) -> Iterator[tuple[tarfile.TarInfo, PurePosixPath]]:
    """Members with their safe relative paths, counted as they are read (a tar has no directory to
    check first); raises on links, devices and limit overruns."""
    budget = _Budget(limits)
    for m in tf:
        rel = _safe_relpath(m.name)
        if m.issym() or m.islnk():
            raise DatasetError(f"archive entry {m.name!r} is a link; only regular files are allowed")
        if not (m.isfile() or m.isdir()):
            raise DatasetError(f"archive entry {m.name!r} is a special file; only regular files are allowed")
        budget.entry(m.name, m.size if m.isfile() else 0)
        yield m, rel


def _extract_tar(archive: Path, dest: Path, limits: ArchiveLimits) -> int:
    with tarfile.open(archive, "r:*") as tf:  # pass 1: headers only, nothing written
        for _ in _tar_members(tf, limits):
            pass
    budget = _Budget(limits)
    with tarfile.open(archive, "r:*") as tf:
        for m, rel in _tar_members(tf, limits):
            if m.isdir():
                budget.entry(m.name, 0)
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            src = tf.extractfile(m)
            assert src is not None  # a regular file always has a stream
            with src:
                _copy_counted(src, dest / rel, m.name, budget)
    return budget.files


def safe_extract(archive: str | Path, dest: str | Path, limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Extract a zip or tar(.gz) archive into `dest` (created; must be empty) and return `dest`.

    Raises DatasetError for unsafe entries, limit overruns, unknown types and corrupt archives;
    on any error `dest` is left empty.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DatasetError(f"archive {archive} does not exist or is not a file")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise DatasetError(f"extraction folder {dest} is not empty; pass an empty or new folder")
    try:
        if _extract_any(archive, dest, limits) == 0:
            raise DatasetError(f"{archive.name} contains no files; archive a folder of class folders with images")
    except BaseException:
        _empty(dest)
        raise
    return dest


def _extract_any(archive: Path, dest: Path, limits: ArchiveLimits) -> int:
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, dest, limits)
        if _is_tar(archive):
            return _extract_tar(archive, dest, limits)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, NotImplementedError) as e:
        raise DatasetError(f"{archive.name} is corrupt or unreadable ({e}); re-create the archive") from e
    if _looks_like_archive(archive):
        raise DatasetError(f"{archive.name} is a corrupt or truncated archive; re-create it (.zip, .tar or .tar.gz)")
    raise ArchiveTypeError(f"{archive.name} is not a zip or tar archive; upload a .zip, .tar or .tar.gz of the "
                           "class folders")


# Leading bytes of zip, gzip, bzip2 and xz data; a tar header says "ustar" at offset 257.
_ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _looks_like_archive(path: Path) -> bool:
    """Whether the file starts as an archive would (so it is a broken one, not another kind of file)."""
    with open(path, "rb") as f:
        head = f.read(512)
    return head.startswith(_ARCHIVE_MAGIC) or head[257:262] == b"ustar"


def _is_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tf:
            tf.next()
        return True
    except (tarfile.TarError, zlib.error, EOFError, OSError):
        return False


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
