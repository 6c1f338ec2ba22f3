"""Schemathesis against the live /openapi.json: generated requests for every operation, 0 server errors.

The schema only exists once the service runs, so the test loads it from a fixture and drives each
operation's Hypothesis strategy itself (schemathesis' lazy pytest loader does not support pytest 9)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from service_support import service_settings, start_service, stop_service

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def base_url(ray_session, tmp_path_factory):
    url = start_service(service_settings(tmp_path_factory.mktemp("fuzz")), "gnsp-fuzz")
    yield url
    stop_service("gnsp-fuzz")


def test_generated_requests_cause_no_server_errors(base_url):
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10  # every route of the API, /healthz and /metrics included
    server_errors: list[str] = []
    calls = 0

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case) -> None:
            nonlocal calls
            response = case.call(base_url=base_url, timeout=60)
            calls += 1
            if response.status_code >= 500:
                failure = f"{case.method} {case.formatted_path}: {response.status_code} {response.text:.200}"
                server_errors.append(failure)
            elif response.status_code >= 400:
                assert "error" in response.json(), response.text  # every 4xx is the JSON error shape

        call()
    assert not server_errors, "\n".join(server_errors)
    assert calls >= len(operations) * 5


def test_without_a_token_the_document_states_no_authentication(base_url):
    doc = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    assert "securitySchemes" not in doc.get("components", {})
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert "security" not in operation and "401" not in operation["responses"], (method, path)


def test_service_is_healthy_after_fuzzing(base_url):
    assert httpx.get(f"{base_url}/healthz", timeout=30).json()["status"] == "ok"
    assert httpx.get(f"{base_url}/v1/models", timeout=30).json()["active_version"] >= 1
