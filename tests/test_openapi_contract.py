"""The OpenAPI document states what the server does: ids and versions with their formats, links
from a created job to what a client does next, the tune body's tasks-or-dataset rule, the dataset
part's media types, and 405 answers whose `Allow` lists every method of the path. Checked on the
FastAPI app itself, no Ray (tests/test_openapi_fuzz.py runs schemathesis against a live service)."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from service.api.app import app
from service.jobs.tasks import new_task_id
from service.tuning.searches import new_search_id

SCHEMA = app.openapi()
OPERATIONS = {op["operationId"]: (path, method, op) for path, ops in SCHEMA["paths"].items()
              for method, op in ops.items()}


def test_every_link_names_an_operation_and_its_parameters():
    links = [(path, name, link) for path, ops in SCHEMA["paths"].items() for op in ops.values()
             for answer in op["responses"].values() for name, link in answer.get("links", {}).items()]
    assert {(p, n) for p, n, _ in links} >= {("/v1/tasks", "GetTask"), ("/v1/tasks", "CancelTask"),
                                            ("/v1/tasks", "Classify"), ("/v1/tune", "GetSearch"),
                                            ("/v1/tune", "CancelSearch"), ("/v1/tune", "ApplySearch"),
                                            ("/v1/tasks/{task_id}", "ClassifyWithVersion")}
    for _, name, link in links:
        _, _, target = OPERATIONS[link["operationId"]]
        names = {p["name"] for p in target.get("parameters", [])}
        assert set(link.get("parameters", {})) <= names, name
    add_task = SCHEMA["paths"]["/v1/tasks"]["post"]["responses"]["202"]["links"]
    assert add_task["GetTask"]["parameters"] == {"task_id": "$response.body#/task_id"}


def test_ids_and_versions_have_the_formats_the_server_makes():
    def parameter(operation: str, name: str) -> dict:
        return next(p for p in OPERATIONS[operation][2]["parameters"] if p["name"] == name)["schema"]

    for operation in ("getTask", "cancelTask"):
        assert re.match(parameter(operation, "task_id")["pattern"], new_task_id())
    for operation in ("getSearch", "cancelSearch", "applySearch"):
        assert re.match(parameter(operation, "job_id")["pattern"], new_search_id())
    assert not re.match(parameter("getTask", "task_id")["pattern"], "../etc")
    assert parameter("getModel", "version")["minimum"] == 1 and parameter("activateModel", "version")["minimum"] == 1


def test_tune_body_states_the_tasks_or_dataset_rule():
    content = SCHEMA["paths"]["/v1/tune"]["post"]["requestBody"]["content"]
    as_json = content["application/json"]["schema"]
    assert as_json["required"] == ["tasks"] and as_json["properties"]["tasks"]["minItems"] == 1
    assert "digits" in as_json["properties"]["tasks"]["items"]["enum"]
    form = content["multipart/form-data"]
    assert form["schema"]["required"] == ["dataset"]
    assert form["encoding"]["request"]["contentType"] == "application/json"
    assert "application/zip" in form["encoding"]["dataset"]["contentType"]
    upload = SCHEMA["paths"]["/v1/tasks"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "dataset" in upload["schema"]["required"] and "application/zip" in upload["encoding"]["dataset"]["contentType"]
    assert "#/$defs/" not in json.dumps(SCHEMA["paths"])  # request bodies carry no dangling local refs


@pytest.mark.parametrize("path, method, allowed", [
    ("/v1/tasks/task-20250101-120000-abcdef", "PUT", {"GET", "HEAD", "DELETE"}),
    ("/v1/tasks/task-20250101-120000-abcdef", "OPTIONS", {"GET", "HEAD", "DELETE"}),
    ("/v1/tasks", "PATCH", {"GET", "HEAD", "POST"}),
    ("/v1/tune/tune-20250101-120000-abcdef", "POST", {"GET", "HEAD", "DELETE"}),
    ("/v1/models/3/activate", "GET", {"POST"}),
])
def test_405_lists_every_method_of_the_path(path, method, allowed):
    response = TestClient(app).request(method, path)
    assert response.status_code == 405
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"
