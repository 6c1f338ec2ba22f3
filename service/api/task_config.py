"""The training settings a remote client may choose: an allow-list of TrainConfig fields, bounded.

TrainConfig (gnsp_core.config) holds everything a trainer can be told, including process settings
(device, DataLoader workers, AMP), memory-sized knobs (LoRA rank, feature-cache views, statistics
batch size), a parameter-name regex (`trainable`, a projection scope) and a prompt template that is
`str.format`ted. Those belong to whoever runs the service, not to whoever can reach its REST port:
over REST only the fields below are accepted, each typed and bounded, so the OpenAPI document states
exactly what a client may send and a wrong value is a 422 naming the field (FastAPI's own error
for a request that breaks its schema) before any upload is stored. Rules between fields (a
threshold's bounds under its rule) are stated in the schema as `anyOf` branches and checked here
too; the training side still validates the combination with TrainConfig.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from gnsp_core.config import EXACT_CUTOFF
from gnsp_core.methods.registry import METHODS
from gnsp_core.schedules import SCHEDULES

from service.errors import BadRequestError, UnknownVersionError

MethodName = Literal[tuple(sorted(METHODS))]  # type: ignore[valid-type]  # the registry is the one list
ScheduleName = Literal[tuple(sorted(SCHEDULES))]  # type: ignore[valid-type]


def _integral(value: Any) -> Any:
    """JSON has one number type: 12.0 is the integer 12 (as JSON Schema says), 12.5 is not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(low: int | None = None, high: int | None = None) -> Any:
    """An integer field as JSON Schema reads it (12.0 included, not "12" or true), within [low, high]."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_integral)]


CUTOFF_THRESHOLD = EXACT_CUTOFF
"""The cut-off rule's threshold when a request names the rule without one (the `gnsp-exact` preset's a)."""
MAX_CUTOFF = 1e6
"""The largest cut-off a a request may send (at 1e6 nearly every direction is in the null space)."""


def threshold_problem(rule: str | None, threshold: float) -> str | None:
    """Why `threshold` does not fit the projection rule (None: energy, the default), or None. The
    energy rule's ρ is a share of the energy, 0 < ρ < 1; the cut-off rule's a multiplies the
    smallest eigenvalue, a >= 1."""
    if rule == "cutoff":
        return None if threshold >= 1 else (
            f"with the cut-off rule the threshold is a multiple a >= 1 of the smallest eigenvalue, got {threshold}: "
            f"send a value in [1, {MAX_CUTOFF:.0f}] (e.g. {EXACT_CUTOFF:g}) or use the energy rule")
    return None if threshold < 1 else (
        f"with the energy rule (the default) the threshold is a share 0 < ρ < 1 of the energy, got {threshold}: "
        'send a value below 1 (e.g. 0.15) or set the rule to "cutoff"')


ENERGY_ENDS = {"exclusiveMinimum": 0, "exclusiveMaximum": 1}
CUTOFF_ENDS = {"minimum": 1, "maximum": MAX_CUTOFF}
PROJECTION_RULES = {"anyOf": [
    {"required": ["rule"], "properties": {"rule": {"const": "cutoff"}, "threshold": CUTOFF_ENDS}},
    {"properties": {"rule": {"enum": ["energy", None]}, "threshold": ENERGY_ENDS}},
]}
"""The threshold's bounds by rule, one `anyOf` branch per rule (a null threshold fits both). Branches,
not `if`/`then`/`else`: clients' generators and validators follow those less well."""


class ProjectionSettings(BaseModel):
    """GNSP's projection: which maps (a fixed choice, never a regex), the rule and its threshold."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=PROJECTION_RULES)
    scope: Literal["vision_mlp", "all"] | None = Field(
        None, description="vision_mlp: vision MLPs + visual projection (paper); all: every linear map of both towers.")
    rule: Literal["energy", "cutoff"] | None = Field(
        None, description="energy: null space holds < threshold of the energy; cutoff: eigenvalues <= threshold * min.")
    threshold: float | None = Field(None, gt=0, le=MAX_CUTOFF, description=(
        f"ρ for energy: 0 < ρ < 1; a for cutoff: 1 <= a <= {MAX_CUTOFF:.0f} (left out: {CUTOFF_THRESHOLD:g} with "
        "cutoff)."))
    target: Literal["gradient", "update"] | None = Field(
        None, description="Project the raw gradient (paper) or the optimiser's whole update.")

    @model_validator(mode="after")
    def _threshold_fits_the_rule(self) -> "ProjectionSettings":
        """PROJECTION_RULES, checked; the cut-off rule named alone gets its own default threshold
        (the service's is the energy rule's ρ, which means nothing to it)."""
        if self.threshold is None:
            if self.rule == "cutoff":
                self.threshold = CUTOFF_THRESHOLD
            return self
        problem = threshold_problem(self.rule, self.threshold)
        if problem:
            raise ValueError(problem)
        return self


class TrainingSettings(BaseModel):
    """Training settings of one task or search; fields left out take the service's defaults
    (a search's applied best config, the model's recommended settings, TrainConfig's defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True, title="TrainingSettings")
    method: MethodName | None = Field(None, description="The continual-learning method (the form's `method` wins).")
    steps: integer(1, 100_000) | None = Field(None, description="Optimiser steps for the task.")
    lr: float | None = Field(None, gt=0, le=1, description="Peak learning rate (AdamW).")
    batch_size: integer(1, 1024) | None = None
    ref_batch_size: integer(1, 1024) | None = Field(None, description="Reference image-caption pairs per step.")
    warmup_steps: integer(0, 100_000) | None = Field(None, description="Linear warm-up steps before cosine decay.")
    weight_decay: float | None = Field(None, ge=0, le=1)
    label_smoothing: float | None = Field(None, ge=0, lt=1)
    seed: integer(0, 2**31 - 1) | None = None
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


class SearchedProjection(BaseModel):
    """A search's projection settings: the maps and the target. The rule and its threshold are what
    the search varies: its threshold range picks the rule (ρ < 1 energy, a >= 1 cut-off)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    scope: Literal["vision_mlp", "all"] | None = ProjectionSettings.model_fields["scope"]
    target: Literal["gradient", "update"] | None = ProjectionSettings.model_fields["target"]


class TuneSettings(TrainingSettings):
    """A search's settings that are not searched: a search tunes GNSP, so its method is gnsp."""

    model_config = ConfigDict(title="TuneSettings")
    method: Literal["gnsp"] | None = Field(None, description="A search tunes GNSP's settings: gnsp or left out.")
    projection: SearchedProjection | None = None


class TaskConfig(TrainingSettings):
    """A task's settings: a search's too, plus a shipped per-task schedule, whose row for the task's
    name gives its lr and steps (a search trains several tasks, so it takes none)."""

    model_config = ConfigDict(title="TaskConfig")
    schedule: ScheduleName | None = Field(None, description=(
        "A shipped per-task learning-rate/step schedule; the task's name picks its row (for example "
        "mtil-order-I and a task named Caltech101; case and punctuation are ignored). lr or steps set "
        "beside it win over the row; a task with no row trains with the service's lr and steps, and the "
        "job's `warnings` say so."))


def _problem(error: dict[str, Any], prefix: tuple[str, ...]) -> dict[str, Any]:
    """One pydantic error located under `prefix`, an unknown field's message listing the allowed ones."""
    loc = (*prefix, *(str(p) for p in error["loc"]))
    message = error["msg"]
    model = {"config": TaskConfig, "projection": ProjectionSettings}.get(loc[-2] if len(loc) > 1 else "")
    if loc[:2] == ("config", "projection") and prefix == ():  # a search's
        model = SearchedProjection
    if error["type"] == "extra_forbidden" and model is not None:
        message = f"not a setting a client may choose; allowed: {', '.join(model.model_fields)}"
        if model is SearchedProjection:
            message += " (a search's threshold range, space.threshold, picks the rule and varies the threshold)"
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


BASE_VERSION_DIGITS = 18
"""A longer number names no version a store could hold: 404 without a look-up."""


def parse_base_version(raw: str | None) -> int | Literal["active"] | None:
    """The `base_version` form field of `POST /v1/tasks`: a version number (the caller checks it
    exists: 404 otherwise), "active", or absent (the head of the version chain). Anything else is
    a 422 naming the field."""
    text = (raw or "").strip()
    if not text:
        return None
    if text == "active":
        return "active"
    digits = text.lstrip("0") if text.isascii() and text.isdigit() else ""
    if not digits:
        raise RequestValidationError([{"loc": ("base_version",), "type": "int_parsing", "msg": (
            f"must be a stored version number (an integer >= 1; GET /v1/models lists them) or \"active\", "
            f"got {text[:40]!r}; leave it out to train from the newest version")}])
    if len(digits) > BASE_VERSION_DIGITS:
        raise UnknownVersionError(f"model version {digits[:20]}... does not exist; GET /v1/models lists the versions")
    return int(digits)
