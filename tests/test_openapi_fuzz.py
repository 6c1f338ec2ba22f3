"""Schemathesis against the live /openapi.json: generated requests for every operation, 0 server errors."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from service_support import service_settings, start_service, stop_service

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture(scope="module")
def base_url(ray_session, tmp_path_factory):
    url = start_service(service_settings(tmp_path_factory.mktemp("fuzz")), "gnsp-fuzz")
    yield url
    stop_service("gnsp-fuzz")


@pytest.fixture()
def api_schema(base_url):
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, base_url):
    response = case.call(base_url=base_url, timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code < 500, response.text


def test_service_is_healthy_after_fuzzing(base_url):
    assert httpx.get(f"{base_url}/healthz", timeout=30).json()["status"] == "ok"
    assert httpx.get(f"{base_url}/v1/models", timeout=30).json()["active_version"] >= 1
