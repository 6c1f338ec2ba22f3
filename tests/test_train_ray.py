"""Ray Train: N workers learn like one process, a killed worker resumes from its checkpoint, and the
specs and records that make a sequence resumable."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from service_support import alive_train_controllers, wait_gone, write_colour_folder
from conftest import reference_pairs
from gnsp_core.config import TrainConfig
from gnsp_core.data import load_task
from gnsp_core.errors import ConfigError, DatasetError
from gnsp_core.evaluation import task_accuracy
from gnsp_core.models import ModelSpec, load_model
from gnsp_core.state import ContinualState
from gnsp_core.trainer import learn_task
from service.cli.learn import build_config, reference_for
from service.training.sequence import learn_sequence, state_folder_name
from service.training.sources import load_reference, task_source
from service.training.ray_train import CrashDrill, TrainJob, WorkerResources, train_task

TINY = ModelSpec(name="tiny", seed=0)


def learn_in_process(source: Path, config: TrainConfig, reference=None) -> tuple[ContinualState, float]:
    """The single-process baseline: learn_task directly, no Ray."""
    loaded = load_model(TINY)
    task = load_task(str(source))
    state = learn_task(ContinualState.initial(loaded.model, TINY), loaded, task, config, reference=reference)
    return state, task_accuracy(loaded, task)


def accuracy_of(state_dir: Path, source: Path) -> float:
    state = ContinualState.load(state_dir)
    loaded = load_model(state.spec)
    loaded.model.load_state_dict(state.weights)
    return task_accuracy(loaded, load_task(str(source)))


@pytest.mark.integration
def test_two_workers_collect_the_statistics_of_one_process(ray_session, tmp_path):
    # A near-zero learning rate keeps the weights equal in both runs, so any difference would
    # come from the sharded, all-reduced statistics pass.
    source = write_colour_folder(tmp_path / "rgb", ["red", "green", "blue"], n_train=16, n_test=8)
    config = TrainConfig(method="gnsp", steps=2, lr=1e-9, batch_size=8, warmup_steps=1, ref_batch_size=8,
                         stats_augment=False).replace(projection_stat_norm="task")
    expected, _ = learn_in_process(source, config, reference=reference_pairs())
    seen = []
    result = learn_sequence([str(source)], tmp_path / "out", TINY, config, workers=2, progress=seen.append,
                            reference="tests.conftest:reference_pairs", checkpoint_every=1)
    assert result.trained == [0] and result.state_dirs == [(tmp_path / "out" / "after_0_rgb").resolve()]
    state = ContinualState.load(result.state_dirs[0])
    assert state.stats.num_tasks == 1 and [r.name for r in state.history] == ["rgb"]
    assert state.stats.covariances.keys() == expected.stats.covariances.keys()
    for name, cov in expected.stats.covariances.items():
        torch.testing.assert_close(state.stats.covariances[name], cov, rtol=1e-4, atol=1e-6, msg=name)
    assert seen[-1].phase == "done" and seen[-1].step == 2 and seen[-1].total == 2

    started = time.perf_counter()  # a finished sequence is not trained again
    again = learn_sequence([str(source)], tmp_path / "out", TINY, config, workers=2,
                           reference="tests.conftest:reference_pairs")
    assert again.trained == [] and time.perf_counter() - started < 1.0


@pytest.mark.integration
def test_killed_worker_resumes_from_its_checkpoint(ray_session, tmp_path):
    source = write_colour_folder(tmp_path / "rgb", ["red", "green", "blue"], n_train=16, n_test=8)
    config = TrainConfig(method="finetune", steps=30, lr=1e-3, batch_size=8, warmup_steps=3)
    marker = tmp_path / "rank1-killed"
    job = TrainJob(task=str(source), config=config, model=TINY, checkpoint_every=10,
                   drill=CrashDrill(rank=1, after_step=10, marker=str(marker)))
    before = alive_train_controllers()
    result = train_task(job, storage_path=str(tmp_path / "runs"), name="killed", out_dir=tmp_path / "state",
                        resources=WorkerResources(workers=2), max_failures=1)
    assert marker.read_text() == "10"  # rank 1 did die after the step-10 checkpoint
    assert result.metrics["resumed_from"] == 10 and result.metrics["step"] == 30
    wait_gone(before, "the finished run's Ray Train controller (held by the SIGINT handler fit() installed)")
    _, uninterrupted = learn_in_process(source, config)
    assert abs(accuracy_of(result.state_dir, source) - uninterrupted) <= 1.0


def test_reference_specs_resolve_in_the_calling_process():
    assert load_reference(None) is None
    assert len(load_reference("tests.conftest:reference_pairs")) == len(reference_pairs())
    for bad in ("tests.conftest", "no_such_module:f", "tests.conftest:no_such_function"):
        with pytest.raises(ConfigError):
            load_reference(bad)
    assert reference_for(None, "gnsp") == "builtin" and reference_for(None, "finetune") is None
    assert reference_for("none", "gnsp") is None


def test_task_sources_are_checked_and_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    assert task_source("photos") == str(tmp_path / "photos")
    assert task_source("digits") == "digits"
    with pytest.raises(DatasetError):
        task_source("no-such-folder")
    assert state_folder_name(2, str(tmp_path / "my photos.tar.gz")) == "after_2_my_photos"
    assert state_folder_name(0, "mtil:cars@/data/mtil") == "after_0_cars"


def test_a_different_sequence_in_the_same_folder_is_refused(tmp_path):
    config = TrainConfig(method="finetune", steps=1)
    (tmp_path / "progress.json").write_text(json.dumps({
        "format": 1, "tasks": ["digits"], "model": TINY.to_dict(), "config": config.to_dict(), "reference": None,
        "completed": [{"task": "digits", "state": "after_0_digits"}], "status": "succeeded"}))
    with pytest.raises(ConfigError, match="config"):
        learn_sequence(["digits"], tmp_path, TINY, config.replace(steps=2))
    with pytest.raises(ConfigError, match="tasks"):
        learn_sequence(["mnist"], tmp_path, TINY, config)
    done = learn_sequence(["digits"], tmp_path, TINY, config)  # finished: returns without starting Ray
    assert done.trained == [] and done.state_dirs == [tmp_path.resolve() / "after_0_digits"]


def test_cli_config_file_then_flags(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"config": {"method": "gnsp", "lr": 3e-5, "projection": {"threshold": 0.2}}}))
    config = build_config(str(path), method=None, steps=7)
    assert (config.method, config.lr, config.steps, config.projection.threshold) == ("gnsp", 3e-5, 7, 0.2)
    assert build_config(None, method="lwf", steps=None).method == "lwf"
    with pytest.raises(ConfigError):
        TrainJob(task="digits", config=config)  # neither a base state nor a model
