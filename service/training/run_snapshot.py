"""A run whose Ray Train snapshot was torn by a crash resumes from its newest whole checkpoint.

Ray Train keeps the list of a run's reported checkpoints in `checkpoint_manager_snapshot.json`
in the run's folder and rewrites it in place after every report. A service killed during that
write leaves it empty or cut short; Ray Train then refuses to start the run again (its controller
dies parsing it), so the job could never resume and would fail. Before a run is started again,
`recover_torn_snapshot` checks that file: a torn one is removed (Ray Train then starts the run
afresh) and the run's newest checkpoint folder that holds a training checkpoint file is returned, for the
workers to resume from instead of Ray Train's own record (a file the crash cut short is found
unreadable there, and the task then starts again).
"""

from __future__ import annotations

import json
import logging
import posixpath

import pyarrow.fs as pafs
from ray.train import Checkpoint

log = logging.getLogger(__name__)
SNAPSHOT = "checkpoint_manager_snapshot.json"
CHECKPOINT_FILE = "train_state.pt"
"""What a whole training checkpoint of service.training.ray_train holds (a final state is not
resumed from here: the run trains again from the newest training checkpoint, and reports it anew)."""


def recover_torn_snapshot(storage_path: str, name: str, filesystem: pafs.FileSystem | None) -> Checkpoint | None:
    """None when the run has no snapshot or a readable one; else remove the torn snapshot and
    return the newest checkpoint folder holding CHECKPOINT_FILE (None if there is none)."""
    fs = filesystem or pafs.LocalFileSystem()
    run = posixpath.join(storage_path, name)
    snapshot = posixpath.join(run, SNAPSHOT)
    if fs.get_file_info(snapshot).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(snapshot) as stream:
            json.loads(stream.read().decode("utf-8"))
        return None
    except (ValueError, UnicodeDecodeError):
        pass
    fs.delete_file(snapshot)
    folders = sorted((info.path for info in fs.get_file_info(pafs.FileSelector(run))
                      if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")),
                     reverse=True)
    for folder in folders:  # named by the time they were reported: newest first
        if fs.get_file_info(posixpath.join(folder, CHECKPOINT_FILE)).type == pafs.FileType.File:
            log.warning("run %s: its checkpoint snapshot was torn by a crash; resuming from %s", name, folder)
            return Checkpoint(path=folder, filesystem=fs)
    log.warning("run %s: its checkpoint snapshot was torn by a crash and no whole checkpoint is left; "
                "it starts again", name)
    return None
