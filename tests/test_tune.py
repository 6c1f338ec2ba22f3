"""Ray Tune over Ray Train: a tiny search end to end, its result files, and resuming after failed trials."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from service_support import write_colour_folder
from gnsp_core.config import TrainConfig
from gnsp_core.data import load_task
from gnsp_core.models import ModelSpec
from service.tuning.run import SearchSpace, TuneRequest, read_results, run_tune_job
from service.training.stored import frozen_outputs_folder
from service.tuning.data import prepare_validation_tasks
from service.tuning.objective import harmonic_mean, score
from service.tuning import trial
from service.tuning.folder import SearchFolder
from service.tuning.trial import TrialSetup, run_trial, trial_config

TINY = ModelSpec(name="tiny", seed=0)
CONFIG = TrainConfig(method="gnsp", steps=4, batch_size=8, warmup_steps=1, ref_batch_size=8, stats_augment=False)


def pixels(samples) -> set[bytes]:
    return {np.asarray(samples[i][0]).tobytes() for i in range(len(samples))}


def test_objective_is_the_harmonic_mean_of_seen_accuracy_and_capped_retention():
    s = score(accs=[60.0, 80.0], learned_accs=[90.0], r1=30.0, baseline_r1=40.0)
    assert s.seen_acc == 70.0 and s.new_acc == 80.0 and s.forgetting == 30.0 and s.retention == 0.75
    assert s.objective == pytest.approx(harmonic_mean(0.7, 0.75))
    assert score([50.0], [], r1=60.0, baseline_r1=40.0).retention == 1.0  # gains do not count
    assert harmonic_mean(0.9, 0.0) == 0.0


def test_validation_split_comes_from_train_data_only(tmp_path):
    source = write_colour_folder(tmp_path / "rg", ["red", "green"], n_train=10, n_test=6, seed=0)
    [folder] = prepare_validation_tasks([str(source)], tmp_path / "data", 0.2, None)
    original, carved = load_task(str(source)), load_task(str(folder))
    assert carved.classnames == original.classnames
    assert len(carved.test) == 4 and len(carved.train) == 16  # 2 of each class's 10 train images
    train_pixels = pixels(original.train)
    assert pixels(carved.test) <= train_pixels and pixels(carved.train) <= train_pixels
    assert not pixels(carved.test) & pixels(original.test)
    assert not pixels(carved.test) & pixels(carved.train)


@pytest.mark.integration
def test_tiny_search_end_to_end_then_resume_after_failed_trials(ray_session, tmp_path, caplog):
    sources = [str(write_colour_folder(tmp_path / "rg", ["red", "green"], n_train=10, n_test=6, seed=0)),
               str(write_colour_folder(tmp_path / "by", ["blue", "yellow"], n_train=10, n_test=6, seed=1))]
    out = tmp_path / "search"
    request = TuneRequest(tasks=sources, out_dir=str(out), model=TINY, trials=3, config=CONFIG,
                          space=SearchSpace(lr=(1e-4, 3e-2)), max_concurrent=3, trial_retries=0)
    # Break task 2 so every trial fails after reporting task 1: an interrupted search.
    folders = prepare_validation_tasks(sources, out / "data", request.val_fraction, None)
    (folders[1] / "train").rename(folders[1] / "hidden")
    first = run_tune_job(request)
    assert {r["status"] for r in first.rows} <= {"error", "stopped"} and first.best is None
    assert read_results(out)["status"] == "failed" and not (out / "best.json").exists()
    caplog.clear()

    (folders[1] / "hidden").rename(folders[1] / "train")
    with caplog.at_level(logging.INFO, logger="gnsp.tune"):
        outcome = run_tune_job(TuneRequest.load(out), resume=True)
    echoed = caplog.text
    assert "task 2/2" in echoed and "task 1/2" not in echoed  # resumed after task 1, not restarted
    rows = outcome.rows
    assert len(rows) == 3 and {r["status"] for r in rows} <= {"complete", "stopped"}
    objectives = [r["objective"] for r in rows]
    assert max(objectives) > min(objectives)
    for name in ("trials.csv", "trials.md", "trials.json", "objective_vs_threshold.png", "best.json"):
        assert (out / name).stat().st_size > 0, name
    best = TrainConfig.from_dict(json.loads((out / "best.json").read_text()))
    assert best == trial_config(CONFIG, outcome.best) == outcome.best_config
    assert read_results(out)["best"]["trial_id"] == outcome.best["trial_id"]
    assert not (out / "work").exists()  # trial states are cleaned up once no trial needs them


@pytest.mark.filterwarnings("ignore:`get_:UserWarning")  # the trial runs outside a Tuner here
def test_a_trial_reports_only_after_its_scratch_is_gone(ray_session, tmp_path, monkeypatch):
    """Tune may end a trial's process at any report (ASHA at a rung, every trial at its last task):
    a scratch folder that spans a report would be left on the node."""
    source = write_colour_folder(tmp_path / "rg", ["red", "green"], n_train=10, n_test=4, seed=0)
    folders = prepare_validation_tasks([str(source)], tmp_path / "data", 0.3, None)
    scratch = tmp_path / "scratch"
    cache = frozen_outputs_folder(str(scratch))
    seen = []
    monkeypatch.setattr(trial, "_report", lambda metrics, progress: seen.append(
        (metrics["tasks_done"], sorted(p.name for p in scratch.iterdir() if p != cache))))
    setup = TrialSetup([str(f) for f in folders], CONFIG, TINY, None, baseline_r1=0.1,
                       work=SearchFolder.local(tmp_path / "search"), scratch_dir=str(scratch))
    run_trial({"threshold": 0.1, "cd_weight": 1.0, "map_weight": 1.0, "lr": 1e-3}, setup)
    assert seen == [(1, [])]
