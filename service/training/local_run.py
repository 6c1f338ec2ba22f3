"""A run in the caller's own process (Ray Train's local mode, `ScalingConfig(num_workers=0)`): its
checkpoints in the run storage, and the CPUs it trains on reserved for it.

A worker group costs two fresh processes per run (Ray Train's controller and the worker), each
importing torch and open_clip and loading the model: on a two-core machine that is most of a small
job's time, while the job runner's attempt host has all of it loaded already. In local mode Ray
Train calls the train loop in the caller's process; what the worker group did around it is done
here instead:

- checkpoints: Ray Train's local mode keeps the last reported checkpoint in memory only. Each one
  is copied into `<storage>/<name>/local/` under the same storage Ray Train would use (the store),
  the two newest kept, and a run started again with the same storage and name resumes from the
  newest, as a worker group's does. A checkpoint counts only once its `COMMITTED` marker is
  written, after its files, so a process killed mid-copy leaves nothing that is read back.
- resources: a placement group of the one worker's resources (CPUs, GPUs, custom) is held while the
  run trains, so nothing Ray schedules meanwhile is given those CPUs. It is made by the calling
  actor; if that actor is killed mid-run the group outlives it and is released like a dead Ray Train
  controller's (service.training.orphans).
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.fs as pafs
import ray
from ray.train import Checkpoint
from ray.util.placement_group import placement_group, remove_placement_group

LOCAL_DIR = "local"
COMMITTED = "COMMITTED"
FINAL = "final"
KEEP = 2
_STEP = re.compile(r"^step-(\d{9})$")


class LocalCheckpoints:
    """The checkpoints of one in-process run, `<storage_path>/<name>/local/{step-NNNNNNNNN,final}/`."""

    def __init__(self, storage_path: str, name: str, filesystem: pafs.FileSystem | None = None) -> None:
        self.filesystem = filesystem or pafs.LocalFileSystem()
        self.root = posixpath.join(storage_path, name, LOCAL_DIR)

    def latest(self) -> Checkpoint | None:
        """The final checkpoint if the run finished, else the newest committed step; None if none."""
        committed = self._committed()
        if FINAL in committed:
            return self._checkpoint(FINAL)
        steps = _steps(committed)
        return self._checkpoint(steps[-1]) if steps else None

    def save_step(self, folder: str | Path, step: int) -> Checkpoint:
        """Copy a step's checkpoint folder in, then drop all but the newest `KEEP` steps."""
        checkpoint = self._save(folder, f"step-{step:09d}")
        for label in _steps(self._labels())[:-KEEP]:
            self.filesystem.delete_dir(posixpath.join(self.root, label))
        return checkpoint

    def save_final(self, folder: str | Path) -> Checkpoint:
        return self._save(folder, FINAL)

    def _save(self, folder: str | Path, label: str) -> Checkpoint:
        target = posixpath.join(self.root, label)
        with contextlib.suppress(FileNotFoundError):
            self.filesystem.delete_dir(target)  # an uncommitted copy a killed process left
        self.filesystem.create_dir(target, recursive=True)
        pafs.copy_files(str(folder), target, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.filesystem)
        with self.filesystem.open_output_stream(posixpath.join(target, COMMITTED)) as marker:
            marker.write(b"")
        return self._checkpoint(label)

    def _checkpoint(self, label: str) -> Checkpoint:
        return Checkpoint(posixpath.join(self.root, label), filesystem=self.filesystem)

    def _labels(self) -> list[str]:
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        return [info.base_name for info in self.filesystem.get_file_info(selector)
                if info.type == pafs.FileType.Directory]

    def _committed(self) -> set[str]:
        labels = self._labels()
        markers = self.filesystem.get_file_info([posixpath.join(self.root, label, COMMITTED) for label in labels])
        return {label for label, marker in zip(labels, markers) if marker.type == pafs.FileType.File}


def _steps(labels: Iterable[str]) -> list[str]:
    """The step checkpoints among `labels`, oldest first (their numbers are zero-padded)."""
    return sorted(label for label in labels if _STEP.match(label))


@contextlib.contextmanager
def reserved(bundle: dict[str, float]) -> Iterator[None]:
    """Hold `bundle` (Ray resources: CPU, GPU, custom) while the block runs, on this node where it
    has them: an in-process run trains on CPUs that nothing else Ray schedules is given meanwhile.
    Waits, as a worker group does, until the cluster has them."""
    here = ray.get_runtime_context().get_node_id()
    group = placement_group([bundle], strategy="STRICT_PACK", _soft_target_node_id=here)
    try:
        ray.get(group.ready())
        yield
    finally:
        remove_placement_group(group)
