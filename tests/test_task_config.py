"""The training config a REST client may send: an allow-list, typed and bounded, refused with a 422
that names the field (no Ray, no HTTP server: the parsing the ingress runs, and its OpenAPI schema)."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError
from jsonschema import Draft202012Validator

from gnsp_core.config import EXACT_CUTOFF, TrainConfig
from gnsp_core.schedules import resolve_schedule
from service.api.schemas import TASK_UPLOAD_BODY, TUNE_BODY
from service.api.task_config import TaskConfig, check_method, parse_base_version, parse_task_config
from service.api.uploads import parse_config, parse_tune_body
from service.errors import BadRequestError, UnknownVersionError
from service.tuning.request import DEFAULT_THRESHOLD, SearchSpace, TuneRequest, projection_for_range


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
    steps = config["properties"]["steps"]  # `int | None` stated as a type list, not anyOf
    assert (steps["type"], steps["minimum"], steps["maximum"]) == (["integer", "null"], 1, 100_000)
    scope = config["properties"]["projection"]["properties"]["scope"]
    assert scope["enum"] == ["vision_mlp", "all", None]
    for body in (TASK_UPLOAD_BODY, TUNE_BODY):
        assert "$ref" not in json.dumps(body) and "$defs" not in json.dumps(body)


# --- base_version of a task -------------------------------------------------------------------


def test_a_tasks_base_version_is_a_number_active_or_absent():
    assert parse_base_version(None) is None and parse_base_version(" ") is None
    assert parse_base_version("3") == 3 and parse_base_version(" 007 ") == 7 and parse_base_version("active") == "active"
    for raw in ("0", "-1", "v2", "2.5", "latest", "٣"):
        with pytest.raises(RequestValidationError) as caught:
            parse_base_version(raw)
        assert caught.value.errors()[0]["loc"] == ("base_version",) and "GET /v1/models" in caught.value.errors()[0]["msg"]
    with pytest.raises(UnknownVersionError):  # a number no store holds: 404, as for any unknown version
        parse_base_version("9" * 40)
    stated = TASK_UPLOAD_BODY["content"]["multipart/form-data"]["schema"]["properties"]["base_version"]
    assert {"type": "integer", "minimum": 1} in stated["anyOf"]


# --- searches: the one cross-field rule is in the schema, and the server agrees with it --------


def tune_body_problems(body: dict) -> list[str]:
    """What the server says about a JSON search body: [] when it would queue it."""
    try:
        fields = parse_tune_body(json.dumps(body))
    except RequestValidationError as exc:
        return [".".join(map(str, e["loc"])) for e in exc.errors()]
    space = {k: v for k, v in (fields.get("space") or {}).items() if v is not None}
    config = {**fields.get("config", {}), "method": "gnsp"}
    if "threshold" in space:  # as the job runner does: the range names the rule
        config["projection"] = {**config.get("projection", {}), **projection_for_range(space["threshold"])}
    TuneRequest(tasks=fields["tasks"], out_dir="/nonexistent/out", config=TrainConfig.from_dict(config),
                space=SearchSpace(**{k: tuple(v) for k, v in space.items()}))  # raises on any rule it checks
    return []


SEARCH_BODIES = [
    ({"tasks": ["digits"], "space": {"threshold": [0.5, 0.01]}}, True),  # ends in either order
    ({"tasks": ["digits"], "space": {"lr": [1e-4, 1e-4], "cd_weight": [0, 0]}}, True),  # equal ends: fixed
    ({"tasks": ["digits"], "space": {"threshold": [0.9, 0.99]}}, True),  # the energy rule's ρ
    ({"tasks": ["digits"], "space": {"threshold": [50, 2]}}, True),  # the cut-off rule's a
    ({"tasks": ["digits"], "space": {"threshold": [1, 1e6]}}, True),
    ({"tasks": ["digits"], "space": {"threshold": [1, 1.5e6]}}, False),
    ({"tasks": ["digits"], "space": {"threshold": [0.2, 1.0]}}, False),  # straddles 1: which rule?
    ({"tasks": ["digits"], "space": {"threshold": [0.5, 2]}}, False),
    ({"tasks": ["digits"], "space": {"threshold": None}}, True),
    ({"tasks": ["digits"], "space": {"threshold": []}}, False),  # two ends, always
    ({"tasks": ["digits"], "space": {"threshold": [0.1, 0.2, 0.3]}}, False),
    ({"tasks": ["digits"], "space": None}, True),
    ({"tasks": ["digits"], "config": {"projection": {"rule": "cutoff"}}}, False),  # the range picks the rule
    ({"tasks": ["digits"], "config": {"projection": {"threshold": 0.2}}}, False),  # and varies the threshold
    ({"tasks": ["digits"], "config": {"projection": {"scope": "all", "target": "update"}},
      "space": {"threshold": [2, 3]}}, True),
    ({"tasks": ["digits"], "config": {"projection": None}}, True),
    ({"tasks": ["digits"], "config": {"method": "lwf"}}, False),  # a search tunes GNSP
    ({"tasks": ["digits"], "config": {"method": "gnsp"}, "space": {"lr": [0, 1e-3]}}, False),
    ({"tasks": ["digits"], "space": {"lr": [1e-5, 2]}}, False),
    ({"tasks": ["digits"], "space": {"map_weight": [100, 0]}}, True),
]


@pytest.mark.parametrize("body, valid", SEARCH_BODIES)
def test_the_search_schema_and_the_server_accept_the_same_bodies(body, valid):
    schema_says = Draft202012Validator(TUNE_BODY["content"]["application/json"]["schema"]).is_valid(body)
    server_says = tune_body_problems(body)
    assert schema_says is valid, body
    assert (server_says == []) is valid, (body, server_says)


def test_a_threshold_range_across_both_rules_names_the_field_and_the_fix():
    with pytest.raises(RequestValidationError) as caught:
        parse_tune_body(json.dumps({"tasks": ["digits"], "space": {"threshold": [0.1, 5]}}))
    (error,) = caught.value.errors()
    assert error["loc"] == ("space", "threshold") and "straddle 1" in error["msg"] and "[10, 1e5]" in error["msg"]
    with pytest.raises(RequestValidationError) as caught:
        parse_tune_body(json.dumps({"tasks": ["digits"], "config": {"projection": {"rule": "cutoff"}}}))
    assert "space.threshold" in caught.value.errors()[0]["msg"]


def test_a_range_names_the_rule_it_searches():
    assert projection_for_range([50, 2]) == {"rule": "cutoff", "threshold": 2.0}
    assert projection_for_range([0.3, 0.01]) == {"rule": "energy", "threshold": 0.01}


def test_search_ranges_are_stored_low_high_and_a_rule_picks_its_default_threshold(tmp_path):
    space = SearchSpace(threshold=(0.4, 0.02), lr=(1e-3, 1e-3))
    assert space.threshold == (0.02, 0.4) and space.lr == (1e-3, 1e-3)
    cutoff = TuneRequest(tasks=["digits"], out_dir=str(tmp_path / "a"),
                         config=TrainConfig().replace(projection_rule="cutoff", projection_threshold=10.0))
    assert cutoff.space.threshold == DEFAULT_THRESHOLD["cutoff"] and cutoff.space.first_point(1e-5)["threshold"] == EXACT_CUTOFF
    energy = TuneRequest(tasks=["digits"], out_dir=str(tmp_path / "b"))
    assert energy.space.threshold == DEFAULT_THRESHOLD["energy"] and energy.space.first_point(1e-5)["threshold"] == 0.15
    assert TuneRequest.from_dict(json.loads(json.dumps(cutoff.to_dict()))).space == cutoff.space  # request.json


def test_a_fixed_range_samples_its_one_value():
    from service.tuning.run import search_space

    space = search_space(SearchSpace(threshold=(0.1, 0.1), cd_weight=(1.5, 1.5), map_weight=(0, 1), lr=(2e-5, 2e-5)))
    assert space["cd_weight"].sample() == 1.5 and space["threshold"].sample() == pytest.approx(0.1)
    assert space["lr"].sample() == pytest.approx(2e-5)


TASK_CONFIGS = [
    ({"projection": {"rule": "cutoff"}}, True),  # the cut-off rule alone gets its own threshold, a = 10
    ({"projection": {"rule": "cutoff", "threshold": 1}}, True),
    ({"projection": {"rule": "cutoff", "threshold": 0.5}}, False),
    ({"projection": {"threshold": 0.99}}, True),
    ({"projection": {"threshold": 1}}, False),  # energy (the default rule): 0 < ρ < 1
    ({"projection": {"rule": None, "threshold": 5}}, False),
    ({"projection": {"rule": "energy", "threshold": None}}, True),
    ({"schedule": "mtil-order-I", "lr": 0.5, "steps": 2}, True),  # settings beside a schedule win over its row
]


@pytest.mark.parametrize("config, valid", TASK_CONFIGS)
def test_the_task_schema_and_the_server_accept_the_same_configs(config, valid):
    stated = TASK_UPLOAD_BODY["content"]["multipart/form-data"]["schema"]["properties"]["config"]
    assert Draft202012Validator(stated).is_valid(config) is valid, config
    try:
        settings = parse_task_config(json.dumps(config))
    except RequestValidationError as exc:
        assert not valid and [e["loc"] for e in exc.errors()] == [("config", "projection")], exc.errors()
        assert "threshold" in exc.errors()[0]["msg"]
        return
    assert valid, config
    own, _ = resolve_schedule(settings, "cars")
    TrainConfig.from_dict({**own, "method": "gnsp"})  # the trainer accepts what the edge accepted


def test_the_cutoff_rule_named_alone_trains_with_its_own_threshold():
    assert parse_task_config('{"projection": {"rule": "cutoff"}}') == {"projection": {"rule": "cutoff", "threshold": EXACT_CUTOFF}}
