"""Facts about the deployment files that their tests share: where they are, what they parse to,
and the pins they must agree with."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

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


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
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
