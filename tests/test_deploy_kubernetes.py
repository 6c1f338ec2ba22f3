"""The cluster files: each one checked by the tool or schema of the system that consumes it.

- deploy/cluster.yaml: Ray's own cluster-launcher schema (ray/autoscaler/ray-schema.json) and the
  checks `ray up` runs (`prepare_config` + `validate_config`).
- deploy/kuberay/*.yaml: the standard objects (PersistentVolumeClaim, Secret) against the Kubernetes
  JSON schemas of `kubernetes-validate` (strict: unknown fields fail). No PyPI package ships
  KubeRay's CRD schema, so the RayService is checked against RAYSERVICE_SCHEMA below: a minimal
  structural schema written here from the field names of KubeRay's ray.io/v1 RayService CRD,
  covering the fields gnsp uses (unknown fields fail), whose pod templates are validated against
  the real Kubernetes PodTemplateSpec definition from the same package.
No Ray cluster is started: everything here is parsing and validation (a few seconds).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from deploy_support import ROOT, dockerfile_uid, DEPLOY, KUBERAY, K8S_DEFS, ray_pin, load_all, manifests, secrets, serve_config_v2


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
