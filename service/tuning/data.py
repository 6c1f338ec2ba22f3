"""Validation data for the search: carved out of training data, never out of a test split.

A search that picks its winner on test data reports an optimistic number for the winner (the
choice itself fits the test set), so every score `gnsp tune` optimises comes from:

- each task's TRAIN split, split once more per class (`split_per_class`, fixed seed): the trials
  train on one part and are scored on the other. Both parts are written as one ImageFolder
  (`train/` = what the trials learn, `test/` = the validation part) in the search's folder: as
  folders on a local disk, as one zip archive each in an object store, which every trial and Ray
  worker fetches into its own scratch (`stored_validation_tasks`).
  The task's real test split is never written, so no trial can see it;
- the built-in reference pool (emoji + flags), split once by a fixed seed: CD/MAP train on
  `tuning_reference()`, zero-shot retention is measured on the disjoint `validation_reference()`.
  Scoring retention on the pairs the distillation losses fit would reward large CD/MAP weights
  for memorising those very pairs, not for keeping the model's image-text alignment.
  The held-out photos (`gnsp bench --eval heldout`) stay untouched: they are a test set.
  gnsp-mini's projections were aligned on this pool, so for it retention measures how much of the
  pre-trained image-text alignment survives on pairs the continual trainer never sees (as ZSCL's
  reference images come from CLIP's pre-training distribution), not accuracy on unseen images.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

from gnsp_core.data import load_task, split_per_class
from gnsp_core.data.folders import write_image_folder
from gnsp_core.data.sources import source_folder_name
from gnsp_core.data.reference import CaptionPairs, load_reference_pairs

from service.training.stored import StoredUpload
from service.tuning.folder import SearchFolder

REFERENCE_KIND = "emoji+flags"
VALIDATION_PAIRS = 128
"""Reference pairs kept out of CD/MAP for retention; 128-way retrieval keeps R@1 far from chance."""
SPLIT_SEED = 0
TUNING_REFERENCE = "service.tuning.data:tuning_reference"
"""The reference spec (see service.training.sources) the trials' workers load for CD/MAP."""
_READY = "validation.json"
IN_FOLDER = "search:"
"""A task source that is a file in the search's own folder (an uploaded dataset): `search:dataset/d.zip`."""


def _validation_indices(size: int) -> set[int]:
    return set(random.Random(SPLIT_SEED).sample(range(size), min(VALIDATION_PAIRS, size // 4)))


def tuning_reference() -> CaptionPairs:
    """The reference pool minus the validation pairs: what CD/MAP see during the search."""
    pairs = load_reference_pairs(REFERENCE_KIND)
    held = _validation_indices(len(pairs))
    return pairs.subset([i for i in range(len(pairs)) if i not in held])


def validation_reference() -> CaptionPairs:
    """The reference pairs no trial trains on: retention is measured here."""
    pairs = load_reference_pairs(REFERENCE_KIND)
    return pairs.subset(sorted(_validation_indices(len(pairs))))


def prepare_validation_tasks(
    sources: list[str], root: Path, val_fraction: float, max_train_per_class: int | None,
) -> list[Path]:
    """Write one ImageFolder per task (train part / validation part of its TRAIN split) under `root`.

    Re-running with the same arguments reuses the folders, so a resumed search scores on the
    same images.
    """
    record = {"sources": sources, "val_fraction": val_fraction, "max_train_per_class": max_train_per_class}
    marker = root / _READY
    folders = [root / f"{i}" / source_folder_name(source) for i, source in enumerate(sources)]
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return folders
    for source, folder in zip(sources, folders):
        shutil.rmtree(folder, ignore_errors=True)  # a different earlier record must not leave images behind
        task = load_task(source, max_train_per_class=max_train_per_class)
        fit_idx, val_idx = split_per_class(task.train.labels, val_fraction, SPLIT_SEED)
        write_image_folder(folder, task.classnames, {"train": task.train.subset(fit_idx), "test": task.train.subset(val_idx)},
                           task.templates)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record))
    return folders


def stored_validation_tasks(sources: list[str], folder: SearchFolder, val_fraction: float,
                            max_train_per_class: int | None, scratch: Path) -> list[str | StoredUpload]:
    """The search's validation tasks in `folder`'s `data/`, as trials address them.

    On a local disk they are folders, read in place. In an object store each is one zip archive,
    written once (a resumed search finds them by their record) and fetched by whoever learns it;
    `search:` sources (an uploaded dataset) are fetched from the folder into `scratch` first."""
    local = folder.local_path
    if local is not None:
        resolved = [str(local / s[len(IN_FOLDER):]) if s.startswith(IN_FOLDER) else s for s in sources]
        return [str(f) for f in prepare_validation_tasks(resolved, local / "data", val_fraction, max_train_per_class)]
    record = {"sources": sources, "val_fraction": val_fraction, "max_train_per_class": max_train_per_class}
    names = [f"data/{i}/{source_folder_name(s)}.zip" for i, s in enumerate(sources)]
    if folder.read_json(f"data/{_READY}") != record:
        with tempfile.TemporaryDirectory(prefix="gnsp-tune-data-", dir=scratch) as tmp:
            work = Path(tmp)
            resolved = [_fetch(s, folder, work / f"in{i}") for i, s in enumerate(sources)]
            folders = prepare_validation_tasks(resolved, work / "data", val_fraction, max_train_per_class)
            for i, (task, name) in enumerate(zip(folders, names)):
                folder.put_file(Path(shutil.make_archive(str(work / f"{i}"), "zip", root_dir=task)), name)
        folder.write_text(f"data/{_READY}", json.dumps(record))
    return [StoredUpload(folder.location, folder.sub(name)) for name in names]


def _fetch(source: str, folder: SearchFolder, scratch: Path) -> str:
    if not source.startswith(IN_FOLDER):
        return source
    rel = source[len(IN_FOLDER):]
    target = scratch / Path(rel).name
    return str(folder.store.get_file(folder.sub(rel), target))
