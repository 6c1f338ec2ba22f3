"""A run whose Ray Train snapshot a crash tore resumes from its newest whole checkpoint folder
(a fresh-clone CI run once killed the service while Ray Train rewrote it: the file was empty,
and the job failed instead of resuming)."""

from __future__ import annotations

import json

from service.training.run_snapshot import CHECKPOINT_FILE, SNAPSHOT, recover_torn_snapshot


def make_run(root, snapshot: bytes | None):
    run = root / "task-1"
    (run / "checkpoint_2026-12-03_00-21-12.965671").mkdir(parents=True)
    (run / "checkpoint_2026-12-03_00-21-12.965671" / CHECKPOINT_FILE).write_bytes(b"older")
    (run / "checkpoint_2026-12-03_00-21-13.570870").mkdir()
    (run / "checkpoint_2026-12-03_00-21-13.570870" / CHECKPOINT_FILE).write_bytes(b"newest whole")
    (run / "checkpoint_2026-12-03_00-21-13.834447").mkdir()  # being written when the service died
    if snapshot is not None:
        (run / SNAPSHOT).write_bytes(snapshot)
    return run


def test_a_torn_snapshot_is_removed_and_the_newest_whole_checkpoint_returned(tmp_path):
    run = make_run(tmp_path, b"")
    checkpoint = recover_torn_snapshot(str(tmp_path), "task-1", None)
    assert checkpoint is not None and checkpoint.path.endswith("checkpoint_2026-12-03_00-21-13.570870")
    assert not (run / SNAPSHOT).exists()  # Ray Train starts the run afresh instead of dying on it


def test_a_readable_snapshot_or_none_is_left_to_ray_train(tmp_path):
    run = make_run(tmp_path, json.dumps({"checkpoint_results": []}).encode())
    assert recover_torn_snapshot(str(tmp_path), "task-1", None) is None
    assert (run / SNAPSHOT).exists()
    assert recover_torn_snapshot(str(tmp_path), "never-run", None) is None


def test_a_torn_snapshot_without_a_whole_checkpoint_starts_the_run_again(tmp_path):
    run = tmp_path / "task-2"
    (run / "checkpoint_2026-12-03_00-21-13.834447").mkdir(parents=True)
    (run / SNAPSHOT).write_bytes(b'{"checkpoint_res')
    assert recover_torn_snapshot(str(tmp_path), "task-2", None) is None
    assert not (run / SNAPSHOT).exists()
