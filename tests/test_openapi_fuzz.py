"""Schemathesis against the live /openapi.json, the way a client would run it:
`schemathesis run --checks all` over every operation, with every phase (examples, coverage,
fuzzing and the stateful phase that follows the schema's links: upload -> status -> classify,
search -> status -> cancel). 0 failures means the schema states every rule the server applies
and the server keeps every promise the schema makes.

The run is bounded and repeatable: few examples per operation, a fixed seed, deterministic
generation, one worker. tests/schemathesis_hooks.py puts real archives and images where the schema
can only say "binary"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service_support import service_settings, start_service, stop_service

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
TESTS = Path(__file__).parent
MAX_EXAMPLES = 10
SEED = 20240601
TIME_LIMIT_S = 600
MAX_RESPONSE_S = 60
"""A slower answer fails the run (no hangs); schemathesis's default of 10 s fails on a busy CI machine
running two test workers, where response time says nothing about the contract (hostile.py measures it)."""
TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def base_url(ray_session, tmp_path_factory):
    url = start_service(service_settings(tmp_path_factory.mktemp("fuzz"), api_token=TOKEN), "gnsp-fuzz")
    yield url
    stop_service("gnsp-fuzz")


def schemathesis_run(base_url: str, report_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()", "run",
               f"{base_url}/openapi.json", "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
               "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--generation-deterministic",
               "--workers", "1", "--request-timeout", "60", "--max-response-time", str(MAX_RESPONSE_S), "--header", f"Authorization: Bearer {TOKEN}", "--suppress-health-check", "all", "--no-color",
               "--report", "ndjson", "--report-dir", str(report_dir)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    # In its own folder: schemathesis keeps a cache of past failures in the working directory and
    # replays them first, which would make this run depend on earlier ones.
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIME_LIMIT_S, cwd=report_dir)


def reported_events(report_dir: Path) -> list[dict]:
    lines = next(report_dir.glob("*.ndjson")).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_schemathesis_all_checks_all_phases_no_failures(base_url, tmp_path):
    result = schemathesis_run(base_url, tmp_path)
    output = result.stdout + result.stderr
    readable = "\n".join(line for line in output.splitlines() if "curl -X" not in line)  # bodies hold zips
    assert result.returncode == 0, readable[-12000:]
    assert "API Links:" in output, output[-4000:]  # the stateful phase ran and followed the links
    assert reported_events(tmp_path), "schemathesis wrote no report"


WRITE_ROUTES = {("POST", "/v1/tasks"), ("DELETE", "/v1/tasks/{task_id}"), ("POST", "/v1/tune"),
                ("DELETE", "/v1/tune/{job_id}"), ("POST", "/v1/tune/{job_id}/apply"),
                ("POST", "/v1/models/{version}/activate")}


def test_the_served_document_states_the_token_on_the_write_routes_only(base_url):
    """The document Serve's ingress replica serves (its own copy of the app) follows its settings:
    with a token, the bearer scheme and a 401 on exactly the write routes (/metrics is open here)."""
    doc = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
    operations = {(method.upper(), path): op for path, ops in doc["paths"].items() for method, op in ops.items()}
    assert {route for route, op in operations.items() if op.get("security")} == WRITE_ROUTES
    for route, op in operations.items():
        assert ("401" in op["responses"]) == (route in WRITE_ROUTES), route


def test_service_is_healthy_after_fuzzing(base_url):
    assert httpx.get(f"{base_url}/healthz", timeout=30).json()["status"] == "ok"
    assert httpx.get(f"{base_url}/v1/models", timeout=30).json()["active_version"] >= 1
