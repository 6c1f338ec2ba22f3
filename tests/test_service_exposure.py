"""Safe defaults before anything starts: no token on a reachable address refuses to start (the CLI,
the app builder, the Docker image's command); the OpenAPI document states the bearer scheme only
where a token is required. No Ray: these run where the service would start. The HTTP side (every
write route with no, a wrong and the right token) is in test_service_bad_input.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from gnsp_core.errors import ConfigError
from service.api import auth
from service.settings import TOKEN_ENV, ServiceSettings, is_loopback

ROOT = Path(__file__).resolve().parents[1]
WRITES = {("/v1/tasks", "post"), ("/v1/tasks/{task_id}", "delete"), ("/v1/tune", "post"),
          ("/v1/tune/{job_id}", "delete"), ("/v1/tune/{job_id}/apply", "post"),
          ("/v1/models/{version}/activate", "post")}


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    yield
    auth.use_settings(ServiceSettings())


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_addresses_need_no_token(host):
    assert is_loopback(host)
    ServiceSettings().check_exposure(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "gnsp.example.com", ""])
def test_a_reachable_address_without_a_token_refuses_to_start(host, monkeypatch):
    assert not is_loopback(host)
    with pytest.raises(ConfigError, match=f"{TOKEN_ENV}.*--insecure"):
        ServiceSettings().check_exposure(host)
    ServiceSettings(api_token="t").check_exposure(host)
    ServiceSettings(insecure=True).check_exposure(host)
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    ServiceSettings().check_exposure(host)


def test_gnsp_serve_exits_non_zero_before_starting_ray(tmp_path, capsys, monkeypatch):
    import ray

    from service.cli.main import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start"))
    assert main(["serve", "--host", "0.0.0.0", "--store", str(tmp_path / "store")]) == 2
    message = capsys.readouterr().err
    assert "refusing to serve on 0.0.0.0" in message and TOKEN_ENV in message and "--insecure" in message


def test_serve_settings_carry_insecure_only_when_asked(tmp_path):
    from service.cli.main import build_parser
    from service.cli.serve import settings_from_args

    parser = build_parser()
    plain = settings_from_args(parser.parse_args(["serve", "--host", "0.0.0.0", "--store", str(tmp_path)]))
    assert plain.insecure is False
    flagged = settings_from_args(parser.parse_args(["serve", "--host", "0.0.0.0", "--insecure", "--store", str(tmp_path)]))
    assert flagged.insecure is True
    flagged.check_exposure("0.0.0.0")


def test_the_docker_image_needs_a_token_or_insecure():
    from service.cli.main import build_parser
    from service.cli.serve import settings_from_args

    cmd = json.loads(re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M).group(1))
    args = build_parser().parse_args(cmd[1:])
    assert args.host == "0.0.0.0"
    with pytest.raises(ConfigError, match="refusing"):
        settings_from_args(args).check_exposure(args.host)
    insecure = build_parser().parse_args([*cmd[1:], "--insecure"])
    settings_from_args(insecure).check_exposure(insecure.host)


def test_build_app_refuses_when_serve_listens_on_a_reachable_address(monkeypatch, tmp_path):
    import service.api.app as api_app

    monkeypatch.setattr(api_app, "serve_http_host", lambda: "0.0.0.0")
    with pytest.raises(ConfigError, match="refusing to serve on 0.0.0.0"):
        api_app.build_app({"store": str(tmp_path / "store")})
    assert api_app.build_app({"store": str(tmp_path / "store"), "insecure": True}) is not None
    monkeypatch.setenv(TOKEN_ENV, "t")
    assert api_app.build_app({"store": str(tmp_path / "store")}) is not None


def test_build_app_without_serve_running_uses_serves_loopback_default(tmp_path):
    """In a process of its own: this test process may hold another test file's Ray session."""
    import subprocess
    import sys

    probe = ("import ray, service.api.app as a; assert not ray.is_initialized(); "
             "assert a.serve_http_host() is None; "  # no Ray here: serve.run would start it on 127.0.0.1
             f"assert a.build_app({{'store': {str(tmp_path / 'store')!r}}}) is not None; print('built')")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != TOKEN_ENV})
    assert result.returncode == 0 and result.stdout.strip() == "built", result.stderr


def openapi(**settings) -> dict:
    import service.api.app as api_app

    auth.use_settings(ServiceSettings(**settings))
    api_app.app.openapi_schema = None
    try:
        return api_app.app.openapi()
    finally:
        api_app.app.openapi_schema = None


def secured(doc: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, ops in doc["paths"].items() for method, op in ops.items() if op.get("security")}


def test_openapi_has_no_auth_without_a_token():
    doc = openapi()
    assert secured(doc) == set() and "securitySchemes" not in doc.get("components", {})
    assert not any("401" in op.get("responses", {}) for ops in doc["paths"].values() for op in ops.values())


def test_openapi_puts_the_bearer_scheme_on_every_write_route_with_a_token():
    doc = openapi(api_token="t")
    writes = {(path, method) for path, ops in doc["paths"].items() for method in ops if method != "get"}
    assert writes - {("/v1/classify", "post")} == WRITES and secured(doc) == WRITES  # classify is a read
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, method in WRITES:
        assert "401" in doc["paths"][path][method]["responses"]
    assert "401" not in doc["paths"]["/v1/tasks/{task_id}"]["get"]["responses"]
    assert secured(openapi(api_token="t", metrics_need_token=True)) == WRITES | {("/metrics", "get")}
