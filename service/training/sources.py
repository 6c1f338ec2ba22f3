"""Task sources and reference specs: the strings that tell a Ray worker which data to load.

Workers receive strings, never datasets, so nothing large travels through the object store and a
restarted worker rebuilds exactly the same data. A task source is whatever
`gnsp_core.data.load_task` accepts; `task_source` makes local paths absolute on the driver (a
worker's working directory is not the driver's). A reference spec is one of
- `builtin` or `builtin:<kind>`: `gnsp_core.data.reference.load_reference_pairs(kind)`
  (`emoji`, `flags`, `emoji+flags`; the default is `emoji+flags`);
- `imagenet:<folder>` or `imagenet:<folder>#N`: N (default 1,000) seeded images of an
  ImageNet-layout folder captioned "a photo of a {class}." (`gnsp_core.data.imagenet`, the paper's
  reference pool); the folder must be on storage every node sees;
- `<module>:<function>`: an importable zero-argument function returning a dataset of
  (image, caption) pairs with `with_transform` (tests use `tests.conftest:reference_pairs`).
  Every worker imports it: on a local cluster the driver's working directory is on the workers'
  sys.path; on a multi-node cluster the module must be installed (or shipped in a runtime_env).
Likewise, on a multi-node cluster task folders and archives must be on storage every node sees.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Callable

from gnsp_core.errors import ConfigError, DatasetError

BUILTIN = "builtin"
IMAGENET = "imagenet:"
_CALLABLE = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<function>[A-Za-z_]\w*)$")


def resolve_callable(spec: str) -> Callable[..., Any]:
    """`package.module:function` -> the function (imported in the calling process)."""
    match = _CALLABLE.match(spec)
    if match is None:
        raise ConfigError(f"{spec!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(match["module"])
    except ImportError as exc:
        raise ConfigError(f"cannot import {match['module']!r} for {spec!r}: {exc}") from exc
    function = getattr(module, match["function"], None)
    if not callable(function):
        raise ConfigError(f"{match['module']!r} has no function {match['function']!r}")
    return function


def task_source(source: str) -> str:
    """Check a task source on the driver (fail fast, before any worker starts); paths become absolute."""
    from gnsp_core.data.builtin import BUILTIN_TASKS, is_builtin_source

    if is_builtin_source(source) or source.startswith("mtil:"):
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"task source {source!r} is neither a built-in task ({', '.join(sorted(BUILTIN_TASKS))}), "
                           "an mtil:<dataset>@<root> source, nor an existing folder or archive")
    return str(path.resolve())


def check_reference_spec(spec: str | None) -> None:
    """Reject a malformed spec on the driver, before any worker starts."""
    if spec is None or spec == BUILTIN or spec.startswith(BUILTIN + ":"):
        return
    if spec.startswith(IMAGENET):
        from gnsp_core.data.imagenet import parse_spec

        folder, _ = parse_spec(spec)
        if not Path(folder).expanduser().is_dir():
            raise DatasetError(f"reference {spec!r}: {folder} is not a folder (an ImageNet-layout train/ folder)")
        return
    if _CALLABLE.match(spec) is None:
        raise ConfigError(f"unknown reference {spec!r}: use 'builtin', 'builtin:<kind>', 'imagenet:<folder>[#N]' "
                          "or 'module:function'")


def load_reference(spec: str | None) -> Any:
    """The reference (image, caption) dataset a spec names, or None."""
    check_reference_spec(spec)
    if spec is None:
        return None
    if spec == BUILTIN or spec.startswith(BUILTIN + ":"):
        from gnsp_core.data.reference import load_reference_pairs

        kind = spec.partition(":")[2]
        return load_reference_pairs(kind) if kind else load_reference_pairs()
    if spec.startswith(IMAGENET):
        from gnsp_core.data.imagenet import imagenet_reference

        return imagenet_reference(spec)
    return resolve_callable(spec)()
