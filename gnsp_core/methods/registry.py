"""The methods by name: the one list of them, so the CLI, the service and the trainer cannot disagree."""

from __future__ import annotations

from gnsp_core.errors import ConfigError
from gnsp_core.methods.base import Method
from gnsp_core.methods.finetune import Finetune
from gnsp_core.methods.gnsp import GNSP
from gnsp_core.methods.lwf import LwF
from gnsp_core.methods.mgclip import MGCLIP
from gnsp_core.methods.wise_ft import WiSEFT
from gnsp_core.methods.zscl import ZSCL
from gnsp_core.task_context import TaskContext

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Finetune, LwF, ZSCL, WiSEFT, MGCLIP, GNSP)}


def method_class(name: str) -> type[Method]:
    """The class behind a `--method` name; an unknown name is a ConfigError that lists the known ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def uses_reference(method: str) -> bool:
    """Whether `method` needs reference pairs, so callers load them only when they are used."""
    return method_class(method).uses_reference


def build_method(ctx: TaskContext) -> Method:
    return method_class(ctx.config.method)(ctx)
