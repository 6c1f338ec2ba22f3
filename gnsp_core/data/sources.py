"""Load a task from any source: a built-in name, MTIL data on disk, an ImageFolder dir or an archive.

A task source is one of
- a built-in name (`digits`, `mnist`, `animals`, `textiles`, `fashion`; see builtin.py), or a
  class group of one, `<name>:<first>-<last>` (e.g. `fashion:0-1`),
- `mtil:<dataset>@<root>` for the real MTIL benchmark data on disk (see mtil.py),
- a folder in ImageFolder layout, `root/<class>/<images>`, or with `root/train/<class>/...` and
  `root/test/<class>/...` splits,
- a `.zip`, `.tar`, `.tar.gz` or `.tgz` of such a folder (a single wrapping top-level folder is fine).

Label ids follow the sorted class-folder names. Class names are the folder names with `_` as a
space, unless `classes.json` at the layout root maps folder -> name; it may also give the task's
prompt templates (see folders.py). Without split folders, a
stratified split is drawn per class from `seed`, so the same seed always gives the same split.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from gnsp_core.data.archives import ArchiveLimits, safe_extract
from gnsp_core.data.builtin import BUILTIN_TASKS, is_builtin_source, load_builtin
from gnsp_core.data.folders import FolderLayout, validate_image_folder
from gnsp_core.data.mtil import load_mtil_source
from gnsp_core.data.samples import ImageSamples, Task, cap_task, split_per_class
from gnsp_core.errors import DatasetError

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def load_task(
    source: str | Path,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    work_dir: str | Path | None = None,
    limits: ArchiveLimits = ArchiveLimits(),
) -> Task:
    """Load a task from any source (see the module docstring).

    Built-in and MTIL tasks have fixed splits (comparable across runs), so `seed` and
    `test_fraction` only matter for folders and archives without train/test folders; `seed`
    also picks which items the per-class caps keep. Archives are extracted into a new folder
    under `work_dir` (default: the system temp dir); the task's images stay there, so the
    caller owns that folder's lifetime. A built-in name wins over a folder of the same name
    (write `./digits` for the folder).
    """
    source = str(source)
    _check_args(seed, test_fraction, max_train_per_class, max_test_per_class)
    caps = (max_train_per_class, max_test_per_class)
    if source.startswith("mtil:"):
        return cap_task(load_mtil_source(source[len("mtil:"):]), *caps, seed=seed)
    if is_builtin_source(source):
        return load_builtin(source, max_train_per_class=max_train_per_class, max_test_per_class=max_test_per_class)
    path = Path(source).expanduser()
    if path.is_dir():
        layout, name = validate_image_folder(path, limits), path.name
    elif path.is_file():
        layout, name = _extract_and_validate(path, work_dir, limits), _archive_stem(path)
    else:
        raise DatasetError(
            f"unknown task source {source!r}: use a built-in name ({', '.join(sorted(BUILTIN_TASKS))}) or a class "
            "group of one (fashion:0-1), "
            "an existing ImageFolder directory, a .zip/.tar/.tar.gz of one, or mtil:<dataset>@<root>"
        )
    return cap_task(_task_from_layout(name, layout, test_fraction, seed), *caps, seed=seed)


def _task_from_layout(name: str, layout: FolderLayout, test_fraction: float, seed: int) -> Task:
    label_of = {folder: i for i, folder in enumerate(layout.folders)}

    def samples(split: dict[str, list[Path]]) -> ImageSamples:
        pairs = [(f, label_of[folder]) for folder, files in split.items() for f in files]
        return ImageSamples([str(f) for f, _ in pairs], [y for _, y in pairs])

    if "all" in layout.splits:
        everything = samples(layout.splits["all"])
        train_idx, test_idx = split_per_class(everything.labels, test_fraction, seed)
        train, test = everything.subset(train_idx), everything.subset(test_idx)
    else:
        train, test = samples(layout.splits["train"]), samples(layout.splits["test"])
    return Task(name=name, classnames=list(layout.classnames), train=train, test=test, templates=layout.templates)


def _extract_and_validate(archive: Path, work_dir: str | Path | None, limits: ArchiveLimits) -> FolderLayout:
    dest = Path(tempfile.mkdtemp(prefix="gnsp-task-", dir=work_dir))
    try:
        return validate_image_folder(safe_extract(archive, dest, limits), limits)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def source_folder_name(source: str) -> str:
    """A task source reduced to a safe folder name: `mtil:cars@/data` -> `cars`, `my photos.zip` -> `my_photos`."""
    stem = source[len("mtil:"):].partition("@")[0] if source.startswith("mtil:") else Path(source.rstrip("/")).name
    stem = _archive_stem(Path(stem or source))
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "task"


def _archive_stem(path: Path) -> str:
    lower = path.name.lower()
    for suffix in _ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)] or path.name
    return path.stem


def _check_args(seed: int, test_fraction: float, *caps: int | None) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}")
    for cap in caps:
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise DatasetError(f"per-class limits must be positive integers or None, got {cap!r}")
