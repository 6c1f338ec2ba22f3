"""The attempt host (service/jobs/host.py) driven directly, on the session's Ray: what a killed attempt
leaves behind. test_service_e2e.py covers the graceful cancel through the REST API."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.jobs import host
from service.jobs.host import RayTrainRunner
from service.jobs.tasks import JobCancelled
from service.store import ModelStore
from service.training.orphans import release_orphaned_placement_groups
from service.versions import ensure_base_version
from service_support import (FAST_CONFIG, alive_actors, colour_zip, live_placement_groups, service_settings,
                             wait_no_new_actors, wait_released)

pytestmark = pytest.mark.integration
TASK_ID = "task-20250101-120000-abcdef"


@pytest.mark.parametrize("workers", [1, 0], ids=["worker group", "in process"])
def test_a_killed_attempts_placement_group_is_removed(ray_session, tmp_path: Path, monkeypatch, workers: int):
    """A stop that the run does not finish within its grace kills the host mid-run: Ray Train's
    controller dies with it, and nothing of Ray's removes the worker group's placement group on a
    Ray without the State API (its CPUs stayed reserved for the service's lifetime); an in-process
    run's reservation (service.training.local_run) is a group the host itself made."""
    settings = service_settings(tmp_path, prime_node=False, workers=workers)
    store = ModelStore.open(settings.store)
    ensure_base_version(store, settings)
    archive = tmp_path / "dataset.zip"
    archive.write_bytes(colour_zip(tmp_path, ["red", "blue"], n_train=4, n_test=1))
    record = {"task_id": TASK_ID, "name": "colours", "method": "finetune", "base_version": 1,
              "config": {**FAST_CONFIG, "steps": 100_000}, "upload": store.put_upload(TASK_ID, archive, "dataset.zip")}
    before, cleaners = live_placement_groups(), alive_actors("PlacementGroupCleaner")
    phases: list[str] = []
    released_while_training: list[list[str]] = []

    def should_stop() -> str | None:
        if "train" not in phases:
            return None
        released_while_training.append(release_orphaned_placement_groups(timeout_s=0))  # a live run's: kept
        return "cancel"

    monkeypatch.setattr(host, "STOP_GRACE_S", 0.0)  # killed at once: no time for Ray Train's abort
    runner = RayTrainRunner(settings)
    try:
        with pytest.raises(JobCancelled):
            runner(record, should_stop, lambda fraction, phase: phases.append(phase))
        assert released_while_training == [[]]
        wait_released(before, "the killed run")
        wait_no_new_actors("PlacementGroupCleaner", cleaners, "Ray Train's cleaner of the killed run (it polls for good)")
    finally:
        runner.close()
