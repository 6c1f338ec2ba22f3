"""The `gnsp` preset and the shipped schedules against the official GNSP recipe, and schedules as
the CLI, the library and the REST jobs read them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gnsp_core.config import TrainConfig, merge_settings, preset, preset_settings
from gnsp_core.errors import ConfigError
from gnsp_core.schedules import SCHEDULES, Schedule, load_schedule, resolve_schedule, task_key

# The official recipe, transcribed from Ppp-Ttt/GNSP configs/mtil_order_I.json and its training code.
OFFICIAL_ORDER_I = ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist",
                    "oxfordpet", "cars", "sun397"]
OFFICIAL_LR = [1e-5, 2e-5, 1e-5, 5e-5, 2e-5, 2e-5, 5e-5, 1e-5, 5e-5, 5e-5, 2e-5]
OFFICIAL_ITERATIONS = [100, 500, 1000, 500, 500, 1000, 1000, 500, 500, 1000, 1000]
OFFICIAL_ORDER_II = ["cars", "food", "mnist", "oxfordpet", "flowers", "sun397", "aircraft", "caltech101", "dtd",
                     "eurosat", "cifar100"]


def test_gnsp_preset_is_the_official_recipe():
    cfg = preset("gnsp")
    assert cfg.method == "gnsp"
    assert (cfg.batch_size, cfg.warmup_steps, cfg.weight_decay, cfg.seed) == (64, 100, 0.0, 42)
    assert cfg.amp is False  # fp32: no bf16 autocast
    assert (cfg.label_smoothing, cfg.logit_scale, cfg.template) == (0.2, 100.0, None)
    assert (cfg.cd_weight, cfg.map_weight, cfg.cd_temperature, cfg.ref_batch_size) == (1.0, 0.75, 2.0, 64)
    assert (cfg.stats_batch_size, cfg.stats_augment, cfg.first_task_full_finetune) == (16, True, True)
    p = cfg.projection
    assert (p.scope, p.target, p.rule, p.threshold, p.stat_norm) == ("vision_mlp", "gradient", "energy", 0.15, "batch")
    assert p.seed_with_reference is False
    assert cfg.trainable == "auto"  # every parameter on any open_clip model (the logit scale stays fixed)
    assert preset("gnsp", steps=5).steps == 5 and preset("gnsp", steps=5).batch_size == 64


def test_preset_settings_merge_under_a_config_file():
    settings = preset_settings("gnsp-exact")
    assert settings["projection"] == {"scope": "all", "target": "update", "rule": "cutoff", "threshold": 1e4}
    merged = merge_settings({"lr": 1e-3, "steps": 30}, settings, {"projection": {"threshold": 4.0}, "steps": 9})
    cfg = TrainConfig.from_dict(merged)
    assert (cfg.lr, cfg.steps, cfg.projection.scope, cfg.projection.threshold) == (1e-3, 9, "all", 4.0)
    assert TrainConfig.from_dict(preset_settings("gnsp")) == preset("gnsp")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_settings("gnsp-fast")


def test_mtil_order_I_schedule_is_the_official_table():
    schedule = SCHEDULES["mtil-order-I"]
    assert schedule.tasks == OFFICIAL_ORDER_I
    assert [schedule.row(t).lr for t in OFFICIAL_ORDER_I] == OFFICIAL_LR
    assert [schedule.row(t).steps for t in OFFICIAL_ORDER_I] == OFFICIAL_ITERATIONS
    cfg = schedule.config_for(preset("gnsp"), "DTD")
    assert (cfg.lr, cfg.steps, cfg.batch_size, cfg.warmup_steps) == (5e-5, 500, 64, 100)


def test_order_II_has_the_same_values_per_dataset_in_its_own_order():
    one, two = SCHEDULES["mtil-order-I"], SCHEDULES["mtil-order-II"]
    assert two.tasks == OFFICIAL_ORDER_II
    assert all(two.row(t) == one.row(t) for t in OFFICIAL_ORDER_II)


def test_task_names_match_loosely_and_a_missing_task_is_named():
    schedule = SCHEDULES["mtil-order-I"]
    assert task_key("Oxford_Pet") == task_key("oxfordpet") and schedule.row("SUN397").steps == 1000
    with pytest.raises(ConfigError, match="no row for task 'digits'.*aircraft"):
        schedule.check(["aircraft", "digits"])


def test_schedule_files(tmp_path: Path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"digits": {"lr": 1e-3, "steps": 3}, "mnist": {"lr": 2e-3, "steps": 5}}))
    schedule = load_schedule(path)
    assert schedule.name == "mine" and schedule.tasks == ["digits", "mnist"]
    assert schedule.config_for(TrainConfig(), "mnist").steps == 5
    assert load_schedule("mtil-order-II") is SCHEDULES["mtil-order-II"]
    assert schedule.to_dict() == {"name": "mine", "tasks": {"digits": {"lr": 1e-3, "steps": 3},
                                                            "mnist": {"lr": 2e-3, "steps": 5}}}


@pytest.mark.parametrize("content, match", [
    ('{"a": {"lr": 0, "steps": 3}}', "expected"),
    ('{"a": {"lr": 1e-3, "steps": 2.5}}', "expected"),
    ('{"a": {"lr": 1e-3, "steps": true}}', "expected"),
    ('{"a": {"lr": 1e-3}}', "expected"),
    ('{"a": {"lr": 1e-3, "steps": 3, "batch_size": 8}}', "expected"),
    ('{"a": {"lr": 1e-3, "steps": 3}, "A": {"lr": 1e-3, "steps": 3}}', "twice"),
    ("[]", "non-empty JSON object"),
    ("{", "cannot read schedule"),
])
def test_bad_schedule_files_say_what_is_wrong(tmp_path: Path, content: str, match: str):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_schedule(path)
    with pytest.raises(ConfigError, match="neither a shipped schedule"):
        load_schedule(tmp_path / "missing.json")


def test_a_job_config_naming_a_schedule():
    assert resolve_schedule({"batch_size": 8}, "cars") == ({"batch_size": 8}, [])
    assert resolve_schedule({"schedule": "mtil-order-I", "batch_size": 8}, "Cars") == \
        ({"batch_size": 8, "lr": 5e-5, "steps": 1000}, [])
    assert resolve_schedule({"schedule": "mtil-order-I"}, None) == ({}, [])  # no task name yet: the name is checked
    with pytest.raises(ConfigError, match="unknown schedule 'order-III'.*mtil-order-I"):
        resolve_schedule({"schedule": "order-III"}, "cars")
    with pytest.raises(ConfigError, match="unknown schedule"):
        resolve_schedule({"schedule": ["mtil-order-I"]}, "cars")


def test_settings_beside_a_schedule_win_over_its_row():
    assert resolve_schedule({"schedule": "mtil-order-I", "steps": 3}, "cars") == ({"lr": 5e-5, "steps": 3}, [])
    assert resolve_schedule({"schedule": "mtil-order-II", "lr": 1e-3, "steps": 3}, "dtd") == \
        ({"lr": 1e-3, "steps": 3}, [])


def test_a_task_with_no_row_keeps_the_services_settings_and_is_warned():
    config, warnings = resolve_schedule({"schedule": "mtil-order-I", "batch_size": 8}, "flowers2")
    assert config == {"batch_size": 8}  # no lr or steps: the service's (recommended, searched) settings apply
    assert len(warnings) == 1 and "no row for task 'flowers2'" in warnings[0] and "caltech101" in warnings[0]


def test_schedule_rows_are_checked_when_built_in_code():
    with pytest.raises(ConfigError):
        Schedule.from_mapping("x", {"a": {"lr": -1.0, "steps": 3}})


# --- where schedules are used: the library's bench, `gnsp learn`, REST jobs ------------------------


def test_bench_trains_each_task_for_its_scheduled_steps(tiny, reference, tmp_path: Path):
    from conftest import colour_task

    from gnsp_core.bench import run_bench

    tasks = [colour_task("warm", ["red", "yellow"], n_train=4), colour_task("cool", ["blue", "green"], n_train=4)]
    schedule = Schedule.from_mapping("two", {"cool": {"lr": 1e-3, "steps": 3}, "warm": {"lr": 2e-3, "steps": 2}})
    steps: dict[str, int] = {}
    config = TrainConfig(method="finetune", steps=50, batch_size=4, warmup_steps=1)
    results = run_bench(tiny, tasks, [], {"finetune": config}, tmp_path, schedule=schedule,
                        progress=lambda method, p: steps.__setitem__(p.task, p.step))
    assert steps == {"warm": 2, "cool": 3} and results["schedule"] == schedule.to_dict()
    with pytest.raises(ConfigError, match="no row for task 'warm'"):
        run_bench(tiny, tasks, [], {"finetune": config}, tmp_path, schedule=SCHEDULES["mtil-order-I"])


def test_learn_checks_the_schedule_before_starting(tmp_path: Path, capsys):
    from service.cli.main import main
    from service.training.sequence import learn_sequence

    code = main(["learn", "--tasks", "digits", "--schedule", "mtil-order-I", "--steps", "3", "--out", str(tmp_path)])
    assert code == 2 and "drop --steps" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no row for task 'digits'"):  # raised before Ray starts
        learn_sequence(["mtil:cars@/data", "digits"], tmp_path / "seq", None, TrainConfig(),
                       schedule=SCHEDULES["mtil-order-I"])
    assert not (tmp_path / "seq").exists()


def test_a_finished_sequence_with_another_schedule_is_refused(tmp_path: Path):
    from gnsp_core.models import ModelSpec
    from service.training.sequence import learn_sequence

    spec, config = ModelSpec(name="tiny", seed=0), TrainConfig(method="finetune", steps=1)
    mine = Schedule.from_mapping("mine", {"digits": {"lr": 1e-3, "steps": 2}})
    (tmp_path / "progress.json").write_text(json.dumps({
        "format": 1, "tasks": ["digits"], "model": spec.to_dict(), "config": config.to_dict(), "reference": None,
        "schedule": mine.to_dict(), "completed": [{"task": "digits", "state": "after_0_digits"}],
        "status": "succeeded"}))
    assert learn_sequence(["digits"], tmp_path, spec, config, schedule=mine).trained == []
    other = Schedule.from_mapping("mine", {"digits": {"lr": 1e-3, "steps": 5}})
    with pytest.raises(ConfigError, match="schedule"):
        learn_sequence(["digits"], tmp_path, spec, config, schedule=other)


def test_cli_preset_then_file_then_flags(tmp_path: Path):
    from service.cli.learn import build_config

    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"batch_size": 32, "projection": {"threshold": 0.1}}))
    config = build_config(str(path), method=None, steps=7, model="tiny", preset="gnsp")
    assert (config.method, config.batch_size, config.warmup_steps, config.amp) == ("gnsp", 32, 100, False)
    assert config.steps == 7
    assert (config.projection.threshold, config.projection.rule) == (0.1, "energy")


def test_rest_jobs_resolve_the_schedule_by_task_name():
    from types import SimpleNamespace

    from service.jobs.runner import JobRunner

    runner = object.__new__(JobRunner.func_or_class)  # the deployment's class, without starting Serve
    runner.settings = SimpleNamespace(model="tiny")
    runner.searches = SimpleNamespace(task_config=lambda method, config: {"lr": 0.5, **config}, stop=lambda: None)
    runner.queue = SimpleNamespace(submit=lambda task_id, name, method, config, upload, dataset, base, warnings:
                                   (config, warnings), stop=lambda: None)
    config, warnings = asyncio.run(runner.submit("t1", "OxfordPet", "gnsp", {"schedule": "mtil-order-I",
                                                                              "batch_size": 8}, "u", {}))
    assert (config["lr"], config["steps"], config["batch_size"]) == (5e-5, 500, 8) and "schedule" not in config
    assert warnings == []
    config, warnings = asyncio.run(runner.submit("t2", "pets", "gnsp", {"schedule": "mtil-order-II"}, "u", {}))
    assert config["lr"] == 0.5 and "steps" not in config and "no row for task 'pets'" in warnings[0]
    asyncio.run(runner.check_config("gnsp", {"schedule": "mtil-order-II", "batch_size": 8}, "eurosat"))
    asyncio.run(runner.check_config("gnsp", {"schedule": "mtil-order-II"}, "pets"))  # a warning, not an error
    with pytest.raises(ConfigError, match="unknown schedule"):
        asyncio.run(runner.check_config("gnsp", {"schedule": "fast"}, "cars"))
