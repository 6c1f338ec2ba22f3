"""The training config a REST client may send: an allow-list, typed and bounded, refused with a 422
that names the field (no Ray, no HTTP server: the parsing the ingress runs, and its OpenAPI schema)."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError

from gnsp_core.config import TrainConfig
from service.api.schemas import TASK_UPLOAD_BODY, TUNE_BODY
from service.api.task_config import TaskConfig, check_method, parse_task_config
from service.api.uploads import parse_config, parse_tune_body
from service.errors import BadRequestError


def refused(raw: str) -> list[dict]:
    with pytest.raises(RequestValidationError) as caught:
        parse_config(raw)
    return caught.value.errors()


@pytest.mark.parametrize("config, field", [
    ({"method": 5}, ("config", "method")),
    ({"method": "magic"}, ("config", "method")),
    ({"trainable": "(a+)+$"}, ("config", "trainable")),
    ({"projection": {"scope": "("}}, ("config", "projection", "scope")),
    ({"projection": {"scope": "visual\\..*"}}, ("config", "projection", "scope")),
    ({"projection": {"stat_norm": "task", "rule": "energy"}}, ("config", "projection", "stat_norm")),
    ({"num_workers": 64}, ("config", "num_workers")),
    ({"device": "cuda:7"}, ("config", "device")),
    ({"amp": False}, ("config", "amp")),
    ({"template": "{0.__class__}"}, ("config", "template")),
    ({"lora_rank": 4096}, ("config", "lora_rank")),
    ({"cache_views": 1000}, ("config", "cache_views")),
    ({"steps": "many"}, ("config", "steps")),
    ({"steps": True}, ("config", "steps")),
    ({"steps": 2.5}, ("config", "steps")),
    ({"steps": 0}, ("config", "steps")),
    ({"steps": 100_001}, ("config", "steps")),
    ({"lr": 0}, ("config", "lr")),
    ({"lr": 1.5}, ("config", "lr")),
    ({"batch_size": 1025}, ("config", "batch_size")),
    ({"label_smoothing": 1.0}, ("config", "label_smoothing")),
    ({"cd_weight": -1}, ("config", "cd_weight")),
    ({"schedule": "../etc"}, ("config", "schedule")),
    ({"schedule": "x" * 65}, ("config", "schedule")),
    ({"projection": {"threshold": 0}}, ("config", "projection", "threshold")),
    ({"projection": "all"}, ("config", "projection")),
])
def test_a_field_outside_the_allow_list_or_its_bounds_is_a_422_naming_it(config, field):
    errors = refused(json.dumps(config))
    assert [tuple(e["loc"]) for e in errors] == [field], errors
    assert all(e["msg"] for e in errors)


def test_an_unknown_field_lists_the_allowed_ones():
    (error,) = refused(json.dumps({"trainable": "all"}))
    assert "steps" in error["msg"] and "cd_weight" in error["msg"] and "trainable" not in error["msg"]
    (error,) = refused(json.dumps({"projection": {"regex": "x"}}))
    assert "scope" in error["msg"] and "steps" not in error["msg"]


def test_config_that_is_not_an_object_is_a_422_and_broken_json_a_400():
    assert [tuple(e["loc"]) for e in refused("[1, 2]")] == [("config",)]
    with pytest.raises(BadRequestError, match="not valid JSON"):
        parse_config("{steps: 3")


def test_allowed_settings_pass_through_and_the_trainer_accepts_them():
    raw = {"method": "gnsp", "steps": 100_000, "lr": 1, "batch_size": 1024, "ref_batch_size": 8, "warmup_steps": 0,
           "weight_decay": 0.01, "label_smoothing": 0.1, "seed": 3, "cd_weight": 0.5, "map_weight": 0.25,
           "cd_temperature": 2.0, "lwf_weight": 1, "zscl_weight": 1, "wise_alpha": 0.5,
           "first_task_full_finetune": False, "stats_augment": False,
           "projection": {"scope": "all", "rule": "cutoff", "threshold": 10.0, "target": "update"}}
    config = parse_task_config(json.dumps(raw))
    assert config == {**raw, "lr": 1.0, "lwf_weight": 1.0, "zscl_weight": 1.0}
    trained = TrainConfig.from_dict(config)
    assert trained.projection.scope == "all" and trained.steps == 100_000
    assert trained.device == "auto" and trained.num_workers == 0 and trained.trainable == "auto"


def test_fields_left_out_or_null_take_the_service_defaults():
    assert parse_config(None) == {} and parse_config("  ") == {}
    assert parse_config('{"steps": 3, "lr": null, "projection": {"rule": null}}') == {"steps": 3, "projection": {}}


def test_a_schedule_is_one_of_the_shipped_names_and_searches_take_none():
    assert parse_config('{"schedule": "mtil-order-I"}') == {"schedule": "mtil-order-I"}
    with pytest.raises(RequestValidationError):
        parse_config('{"schedule": "order-III"}')
    with pytest.raises(RequestValidationError):
        parse_tune_body('{"tasks": ["digits"], "config": {"schedule": "mtil-order-I"}}')


def test_the_form_method_must_be_a_registered_method():
    assert check_method("lwf") == "lwf"
    with pytest.raises(RequestValidationError) as caught:
        check_method("magic")
    assert caught.value.errors()[0]["loc"] == ("method",) and "gnsp" in caught.value.errors()[0]["msg"]


def test_tune_requests_use_the_same_allow_list():
    assert parse_tune_body(b'{"tasks": ["digits"], "config": {"steps": 3, "lr": null}}') == {
        "tasks": ["digits"], "config": {"steps": 3}}
    for body, loc in [({"tasks": ["digits"], "config": {"device": "cuda:7"}}, ("config", "device")),
                      ({"tasks": ["digits"], "config": {"steps": "3"}}, ("config", "steps")),
                      ({"tasks": ["digits"], "trials": 0}, ("trials",)),
                      ({"tasks": ["digits"], "out_dir": "/tmp/x"}, ("out_dir",))]:
        with pytest.raises(RequestValidationError) as caught:
            parse_tune_body(json.dumps(body))
        assert [tuple(e["loc"]) for e in caught.value.errors()] == [loc], body


def test_openapi_states_the_allow_list_without_dangling_references():
    schema = TASK_UPLOAD_BODY["content"]["multipart/form-data"]
    config = schema["schema"]["properties"]["config"]
    assert schema["encoding"]["config"]["contentType"] == "application/json"
    assert config["additionalProperties"] is False and set(config["properties"]) == set(TaskConfig.model_fields)
    assert not {"trainable", "device", "num_workers", "amp", "template"} & set(config["properties"])
    steps = next(s for s in config["properties"]["steps"]["anyOf"] if s.get("type") == "integer")
    assert (steps["minimum"], steps["maximum"]) == (1, 100_000)
    scope = config["properties"]["projection"]["anyOf"][0]["properties"]["scope"]["anyOf"][0]
    assert scope["enum"] == ["vision_mlp", "all"]
    for body in (TASK_UPLOAD_BODY, TUNE_BODY):
        assert "$ref" not in json.dumps(body) and "$defs" not in json.dumps(body)
