"""The layering the README's Layout section promises, checked on the source tree."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CYCLES_TOOL = ROOT.parent / "shared" / "tools" / "import_cycles.py"


def imports_of(package: str) -> dict[str, set[str]]:
    """Module name -> every module it imports (top-level and inside functions)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[module] = names
    return found


def test_gnsp_core_never_imports_ray_http_or_the_service():
    banned = ("ray", "fastapi", "starlette", "uvicorn", "service")
    offenders = {m: sorted(n for n in names if n.split(".")[0] in banned)
                 for m, names in imports_of("gnsp_core").items()}
    assert not {m: n for m, n in offenders.items() if n}


def test_lower_packages_do_not_reach_up():
    core, service = imports_of("gnsp_core"), imports_of("service")
    for module, names in core.items():
        if module.startswith("gnsp_core.data"):
            outside = {n for n in names if n.startswith("gnsp_core") and not n.startswith("gnsp_core.data")}
            assert outside <= {"gnsp_core.errors"}, (module, outside)
    for module, names in service.items():
        if module.startswith("service.store"):
            outside = {n for n in names if n.startswith("service") and not n.startswith("service.store")}
            assert outside <= {"service.errors"}, (module, outside)
        if not module.startswith("service.cli"):
            assert not {n for n in names if n.startswith("service.cli")}, module


def test_evaluating_a_model_does_not_load_the_training_stack():
    probe = ("import sys, gnsp_core.evaluation, gnsp_core.zeroshot; "
             "print(' '.join(m for m in ('gnsp_core.trainer', 'gnsp_core.task_context', 'gnsp_core.methods.base', "
             "'gnsp_core.methods.registry', 'gnsp_core.projection') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == ""


def test_public_api_names_resolve():
    import gnsp_core

    assert all(getattr(gnsp_core, name) is not None for name in gnsp_core.__all__)
    with pytest.raises(AttributeError):
        gnsp_core.no_such_name  # noqa: B018


@pytest.mark.skipif(not CYCLES_TOOL.is_file(), reason="needs ../shared/tools/import_cycles.py beside the checkout")
def test_no_import_cycles():
    result = subprocess.run([sys.executable, str(CYCLES_TOOL), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
