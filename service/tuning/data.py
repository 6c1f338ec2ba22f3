"""Validation data for the search: carved out of training data, never out of a test split.

A search that picks its winner on test data reports an optimistic number for the winner (the
choice itself fits the test set), so every score `gnsp tune` optimises comes from:

- each task's TRAIN split, split once more per class (`split_per_class`, fixed seed): the trials
  train on one part and are scored on the other. Both parts are written as one ImageFolder
  (`train/` = what the trials learn, `test/` = the validation part) that Ray workers load by path.
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
from pathlib import Path

from gnsp_core.data import load_task, split_per_class
from gnsp_core.data.folders import write_image_folder
from gnsp_core.data.sources import source_folder_name
from gnsp_core.data.reference import CaptionPairs, load_reference_pairs

REFERENCE_KIND = "emoji+flags"
VALIDATION_PAIRS = 128
"""Reference pairs kept out of CD/MAP for retention; 128-way retrieval keeps R@1 far from chance."""
SPLIT_SEED = 0
TUNING_REFERENCE = "service.tuning.data:tuning_reference"
"""The reference spec (see service.training.sources) the trials' workers load for CD/MAP."""
_READY = "validation.json"


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
