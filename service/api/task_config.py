"""The training settings a remote client may choose: an allow-list of TrainConfig fields, bounded.

TrainConfig (gnsp_core.config) holds everything a trainer can be told, including process settings
(device, DataLoader workers, AMP), memory-sized knobs (LoRA rank, feature-cache views, statistics
batch size), a parameter-name regex (`trainable`, a projection scope) and a prompt template that is
`str.format`ted. Those belong to whoever runs the service, not to whoever can reach its REST port:
over REST only the fields below are accepted, each typed and bounded, so the OpenAPI document states
exactly what a client may send and a wrong value is a 422 naming the field (FastAPI's own error
for a request that breaks its schema) before any upload is stored. The training side still validates the combination (and a schedule's name) with TrainConfig.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gnsp_core.methods.registry import METHODS
from gnsp_core.schedules import SCHEDULES

from service.errors import BadRequestError

MethodName = Literal[tuple(sorted(METHODS))]  # type: ignore[valid-type]  # the registry is the one list
ScheduleName = Literal[tuple(sorted(SCHEDULES))]  # type: ignore[valid-type]


class ProjectionSettings(BaseModel):
    """GNSP's projection: which maps (a fixed choice, never a regex), the rule and its threshold."""

    model_config = ConfigDict(extra="forbid", strict=True)
    scope: Literal["vision_mlp", "all"] | None = Field(
        None, description="vision_mlp: vision MLPs + visual projection (paper); all: every linear map of both towers.")
    rule: Literal["energy", "cutoff"] | None = Field(
        None, description="energy: null space holds < threshold of the energy; cutoff: eigenvalues <= threshold * min.")
    threshold: float | None = Field(None, gt=0, le=1000, description="ρ for energy (0..1), a for cutoff.")
    target: Literal["gradient", "update"] | None = Field(
        None, description="Project the raw gradient (paper) or the optimiser's whole update.")


class TrainingSettings(BaseModel):
    """Training settings of one task or search; fields left out take the service's defaults
    (a search's applied best config, the model's recommended settings, TrainConfig's defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True, title="TrainingSettings")
    method: MethodName | None = Field(None, description="The continual-learning method (the form's `method` wins).")
    steps: int | None = Field(None, ge=1, le=100_000, description="Optimiser steps for the task.")
    lr: float | None = Field(None, gt=0, le=1, description="Peak learning rate (AdamW).")
    batch_size: int | None = Field(None, ge=1, le=1024)
    ref_batch_size: int | None = Field(None, ge=1, le=1024, description="Reference image-caption pairs per step.")
    warmup_steps: int | None = Field(None, ge=0, le=100_000, description="Linear warm-up steps before cosine decay.")
    weight_decay: float | None = Field(None, ge=0, le=1)
    label_smoothing: float | None = Field(None, ge=0, lt=1)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    cd_weight: float | None = Field(None, ge=0, le=100, description="Contrastive distillation weight (GNSP).")
    map_weight: float | None = Field(None, ge=0, le=100, description="Modality alignment preservation weight (GNSP).")
    cd_temperature: float | None = Field(None, gt=0, le=100)
    lwf_weight: float | None = Field(None, ge=0, le=100)
    zscl_weight: float | None = Field(None, ge=0, le=100)
    wise_alpha: float | None = Field(None, ge=0, le=1, description="WiSE-FT interpolation weight.")
    first_task_full_finetune: bool | None = None
    stats_augment: bool | None = Field(None, description="GNSP statistics pass with train augmentation.")
    projection: ProjectionSettings | None = None

    def settings(self) -> dict[str, Any]:
        """The fields the client set, as TrainConfig data (nested projection fields included)."""
        return self.model_dump(exclude_unset=True, exclude_none=True)


class TaskConfig(TrainingSettings):
    """A task's settings: a search's too, plus a shipped per-task schedule, whose row for the task's
    name gives its lr and steps (a search trains several tasks, so it takes none)."""

    model_config = ConfigDict(title="TaskConfig")
    schedule: ScheduleName | None = Field(None, description=(
        "A shipped per-task learning-rate/step schedule; the task's name picks its row (for example "
        "mtil-order-I and a task named Caltech101)."))


def _problem(error: dict[str, Any], prefix: tuple[str, ...]) -> dict[str, Any]:
    """One pydantic error located under `prefix`, an unknown field's message listing the allowed ones."""
    loc = (*prefix, *(str(p) for p in error["loc"]))
    message = error["msg"]
    model = {"config": TaskConfig, "projection": ProjectionSettings}.get(loc[-2] if len(loc) > 1 else "")
    if error["type"] == "extra_forbidden" and model is not None:
        message = f"not a setting a client may choose; allowed: {', '.join(model.model_fields)}"
    return {"loc": loc, "msg": message, "type": error["type"]}


def as_validation_error(exc: ValidationError, prefix: tuple[str, ...]) -> RequestValidationError:
    """A validation failure as FastAPI's own 422, each problem named by its field under `prefix`."""
    return RequestValidationError([_problem(e, prefix) for e in exc.errors(include_url=False, include_input=False)])


def check_task_config(data: Any, prefix: tuple[str, ...] = ("config",)) -> dict[str, Any]:
    """`data` checked against TaskConfig: the fields set, or a 422 naming each bad field."""
    if not isinstance(data, dict):
        raise RequestValidationError([{"loc": prefix, "type": "dict_type",
                                       "msg": 'must be a JSON object of training settings, e.g. {"steps": 100}'}])
    try:
        return TaskConfig.model_validate(data).settings()
    except ValidationError as exc:
        raise as_validation_error(exc, prefix) from None


def check_method(name: str) -> str:
    """The form's `method` field: a registered method name, or a 422 listing them."""
    if name not in METHODS:
        raise RequestValidationError([{"loc": ("method",), "type": "literal_error",
                                       "msg": f"unknown method {name[:60]!r}; choose one of {', '.join(sorted(METHODS))}"}])
    return name


def parse_task_config(raw: str | None) -> dict[str, Any]:
    """The `config` form field of `POST /v1/tasks`: JSON text (400 if it does not parse) of a TaskConfig."""
    if raw is None or not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"config is not valid JSON ({exc.msg}); send an object like {{\"steps\": 100}}") from None
    return check_task_config(data)
