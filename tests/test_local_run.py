"""Training in the caller's process (Ray Train's local mode, service/training/local_run.py): its
checkpoints land in the run storage and a run started again resumes from them, as a worker group's
do; its resources are reserved while it trains and released after."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gnsp_core.config import TrainConfig
from gnsp_core.models import ModelSpec
from gnsp_core.state import ContinualState
from service.training.local_run import COMMITTED, LocalCheckpoints
from service.training.ray_train import TrainJob, WorkerResources, train_task
from service_support import alive_train_controllers, live_placement_groups, write_colour_folder

TINY = ModelSpec(name="tiny", seed=0)


def checkpoint_folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "train_state.pt").write_bytes(name.encode())
    return folder


def test_the_newest_committed_checkpoint_is_read_back_and_two_steps_are_kept(tmp_path: Path):
    checkpoints = LocalCheckpoints(str(tmp_path / "runs"), "run")
    assert checkpoints.latest() is None
    for step in (2, 4, 6):
        saved = checkpoints.save_step(checkpoint_folder(tmp_path, f"s{step}"), step)
        assert Path(saved.path).name == f"step-{step:09d}"
    root = tmp_path / "runs" / "run" / "local"
    assert sorted(p.name for p in root.iterdir()) == ["step-000000004", "step-000000006"]
    (root / "step-000000008").mkdir()  # a copy cut short: no marker, never read back
    (root / "step-000000008" / "train_state.pt").write_bytes(b"torn")
    latest = checkpoints.latest()
    assert Path(latest.path).name == "step-000000006"
    assert (Path(latest.path) / "train_state.pt").read_bytes() == b"s6"

    final = checkpoints.save_final(checkpoint_folder(tmp_path, "state"))
    assert (Path(final.path) / COMMITTED).is_file()
    assert Path(checkpoints.latest().path).name == "final"  # a finished run is not trained again


@pytest.mark.integration
def test_an_in_process_run_checkpoints_into_its_storage_and_resumes_from_it(ray_session, tmp_path: Path):
    source = write_colour_folder(tmp_path / "rgb", ["red", "green", "blue"], n_train=16, n_test=8)
    config = TrainConfig(method="finetune", steps=6, lr=1e-3, batch_size=8, warmup_steps=1)
    job = TrainJob(task=str(source), config=config, model=TINY, checkpoint_every=2)
    resources = WorkerResources(workers=0, cpus_per_worker=1)
    controllers, groups, threads = alive_train_controllers(), live_placement_groups(), torch.get_num_threads()
    try:
        first = train_task(job, storage_path=str(tmp_path / "runs"), name="run", out_dir=tmp_path / "first",
                           resources=resources)
        assert alive_train_controllers() == controllers  # no worker group: this process trained
        assert live_placement_groups() == groups  # the reservation ended with the run
        root = tmp_path / "runs" / "run" / "local"
        steps = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
        assert "final" in {p.name for p in root.iterdir()} and 1 <= len(steps) <= 2, steps
        assert first.metrics["resumed_from"] is None and first.metrics["step"] == 6
        assert ContinualState.load(first.state_dir).history[-1].name == "rgb"

        (root / "final" / COMMITTED).unlink()  # as if the process had died while saving the end
        again = train_task(job, storage_path=str(tmp_path / "runs"), name="run", out_dir=tmp_path / "again",
                           resources=resources)
        assert again.metrics["resumed_from"] == int(steps[-1].removeprefix("step-")), again.metrics
        assert ContinualState.load(again.state_dir).history[-1].name == "rgb"
    finally:
        torch.set_num_threads(threads)
