"""The `gnsp` preset and the shipped schedules against the official GNSP recipe, and schedules as
the CLI, the library and the REST jobs read them."""

from __future__ import annotations

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
    assert settings["projection"] == {"scope": "all", "target": "update", "rule": "cutoff", "threshold": 10.0}
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
    assert resolve_schedule({"batch_size": 8}, "cars") == {"batch_size": 8}
    assert resolve_schedule({"schedule": "mtil-order-I", "batch_size": 8}, "Cars") == \
        {"batch_size": 8, "lr": 5e-5, "steps": 1000}
    assert resolve_schedule({"schedule": "mtil-order-I"}, None) == {}  # no task name yet: the name is checked
    with pytest.raises(ConfigError, match="unknown schedule 'order-III'.*mtil-order-I"):
        resolve_schedule({"schedule": "order-III"}, "cars")
    with pytest.raises(ConfigError, match="unknown schedule"):
        resolve_schedule({"schedule": ["mtil-order-I"]}, "cars")
    with pytest.raises(ConfigError, match="no row for task 'flowers2'"):
        resolve_schedule({"schedule": "mtil-order-I"}, "flowers2")
    with pytest.raises(ConfigError, match=r"sets \['steps'\] and schedule"):
        resolve_schedule({"schedule": "mtil-order-I", "steps": 3}, "cars")


def test_schedule_rows_are_checked_when_built_in_code():
    with pytest.raises(ConfigError):
        Schedule.from_mapping("x", {"a": {"lr": -1.0, "steps": 3}})
