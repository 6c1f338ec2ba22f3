"""Pydantic models of the REST API (the HTTP edge only; inside, the service passes dicts and dataclasses)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gnsp_core.data.builtin import BUILTIN_TASKS
from gnsp_core.methods.registry import METHODS

from service.api.task_config import CUTOFF_ENDS, ENERGY_ENDS, MAX_CUTOFF, TaskConfig, TuneSettings, integer
from service.api.json_schema import inline_schema
from service.jobs.states import JobStatus
from service.settings import ServiceSettings

TASK_NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
"""A task name: 1 to 100 characters, not all blank, no control characters (kept without its outer blanks)."""


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error name, e.g. bad_dataset, unknown_version.")
    message: str = Field(description="What went wrong and how to fix it.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


WARNINGS = Field(default_factory=list, description=(
    "What the job does differently from what its request may suggest, e.g. a task the named schedule "
    "has no row for trains with the service's lr and steps."))


class TaskAccepted(BaseModel):
    task_id: str
    status: JobStatus = "queued"
    warnings: list[str] = WARNINGS


class TaskView(BaseModel):
    task_id: str
    name: str
    status: JobStatus
    progress: float = Field(ge=0, le=1, description="0..1; live while running (from the Ray Train progress board).")
    phase: str | None = Field(
        None, description="queued | starting | train | <method phase> | evaluating | publishing | <final status>")
    metrics: dict[str, Any] = Field(default_factory=dict)
    model_version: int | None = Field(
        None, description="The version this job produced (stored even when not activated).")
    activated: bool = False
    error: str | None = None
    note: str | None = None
    method: str | None = None
    config: dict[str, Any] = Field(default_factory=dict, description="The TrainConfig fields given with the task.")
    base_version: int | None = Field(
        None, description=("The version this job trains from: the one its request named, else, when it started, "
                           "the active version (activation auto) or the newest version that passed the quality "
                           "gate (activation manual)."))
    warnings: list[str] = WARNINGS
    attempts: int = Field(0, description="Starts of this job: 2 or more means it resumed after an interruption.")
    created: float | None = None
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False
    dataset: dict[str, Any] = Field(default_factory=dict)


class TaskList(BaseModel):
    tasks: list[TaskView]


class ClassifyRequest(BaseModel):
    images: list[str] = Field(min_length=1, description="Base64 PNG or JPEG images (a data: URL prefix is accepted).")
    labels: list[str] = Field(min_length=1, description="Candidate class names; scores are over these labels.")
    model_version: int | None = Field(None, description="Pin a version; null uses the active version.")


class ClassifyResult(BaseModel):
    label: str
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    model_version: int
    results: list[ClassifyResult]


class ModelView(BaseModel):
    version: int
    active: bool
    created: float | None = None
    parent: int | None = None
    task: str | None = Field(None, description="The task that produced this version (null for version 1).")
    task_id: str | None = None
    method: str | None = None
    tasks: list[str] = Field(default_factory=list, description="Every task learned so far, in order.")
    metrics: dict[str, Any] = Field(default_factory=dict)
    gate: dict[str, Any] = Field(default_factory=dict)
    spec: dict[str, Any] | None = None
    recommended_training: dict[str, Any] = Field(
        default_factory=dict, description="Training settings the model recommends, used for tasks whose config "
                                          "leaves them out (empty: TrainConfig's defaults, the paper's).")


class ModelList(BaseModel):
    active_version: int | None
    models: list[ModelView]
    history: list[dict[str, Any]] = Field(default_factory=list, description="Activations, oldest first.")


class ActivationResponse(BaseModel):
    active_version: int
    previous_version: int | None = None


class Health(BaseModel):
    """Readiness: `ok` (HTTP 200) once a model version is active, so classify can answer;
    `starting` (HTTP 503) before. `role` says whether this service runs the jobs (`writer`, it holds
    the store's writer lease) or waits for the lease (`standby`, e.g. an upgrade's other cluster).
    `primed`: whether the writer has primed its node for jobs (see ServiceSettings.prime_node); a
    job sent before waits for it."""

    status: Literal["ok", "starting"] = "ok"
    active_version: int | None = None
    role: Literal["writer", "standby"] | None = None
    lease_holder: str | None = None
    primed: bool = False


Weight = Annotated[float, Field(ge=0, le=100)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
Threshold = Annotated[float, Field(gt=0, le=MAX_CUTOFF)]
RANGE_ENDS = "Two ends, in either order; equal ends fix the value (it is not searched)."


def _range(description: str) -> Any:
    return Field(None, min_length=2, max_length=2, description=f"{description} {RANGE_ENDS}")


class SearchRanges(BaseModel):
    """The searched values' ranges; one left out (or null) keeps its default range."""

    model_config = ConfigDict(extra="forbid", strict=True)
    threshold: Annotated[list[Threshold], Field(min_length=2, max_length=2, json_schema_extra={
        "anyOf": [{"items": ENERGY_ENDS}, {"items": CUTOFF_ENDS}]})] | None = Field(
        None, description=("Null-space threshold range (log scale); it picks the projection rule: ends in (0, 1) search "
                     f"the energy rule's ρ (the default, [0.01, 0.5]), ends in [1, {MAX_CUTOFF:.0f}] the cut-off "
                     f"rule's a (e.g. [10, 1e5]). {RANGE_ENDS}"))
    cd_weight: list[Weight] | None = _range("CD weight range, 0 to 100.")
    map_weight: list[Weight] | None = _range("MAP weight range, 0 to 100.")
    lr: list[LearningRate] | None = _range("Learning-rate range (log scale), above 0 and at most 1.")

    @field_validator("threshold")
    @classmethod
    def _one_rule(cls, ends: list[float] | None) -> list[float] | None:
        """Both ends on one rule's side of 1 (the schema's anyOf)."""
        if ends is not None and min(ends) < 1 <= max(ends):
            raise ValueError(f"the ends {ends} straddle 1: send both below 1 (the energy rule's ρ, e.g. "
                             f"[0.01, 0.5]) or both in [1, {MAX_CUTOFF:.0f}] (the cut-off rule's a, e.g. [10, 1e5])")
        return ends


BUILTIN_TASK_NAMES = sorted(BUILTIN_TASKS)


class TuneBody(BaseModel):
    """`POST /v1/tune`: what to search. The service picks the model, the hardware and where results go.

    Strict: a value of another JSON type than the schema's is refused, never coerced (0 is no boolean)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    tasks: list[str] = Field(default_factory=list, json_schema_extra={"items": {"enum": BUILTIN_TASK_NAMES}},
                             description=("Built-in task names, learned in order; an uploaded dataset (multipart) is "
                                          "learned after them. A search needs at least one task: name one here or "
                                          "upload a dataset."))
    trials: integer(1, 500) = 12
    config: TuneSettings = Field(default_factory=TuneSettings,
                                 description="Training settings not searched (steps, ...); method gnsp.")
    space: SearchRanges | None = None
    searcher: Literal["optuna", "random"] = "optuna"
    max_concurrent: integer(1) | None = None
    max_train_per_class: integer(1) | None = None
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of each task's train split used to validate.")
    seed: integer(0, 2**31 - 1) = 0
    base_version: integer(1) | Literal["active"] | None = Field(
        "active", description="Trials start from this stored version; null: from the bare model.")
    apply_best: bool = Field(False, description="When it succeeds, its best config becomes the default for new tasks.")


class TuneView(BaseModel):
    job_id: str
    status: JobStatus
    progress: float = Field(ge=0, le=1, description="Share of the trial budget done (trials count by tasks learned).")
    error: str | None = None
    trials: list[dict[str, Any]] = Field(default_factory=list, description="One row per trial, best first.")
    best: dict[str, Any] | None = Field(None, description="The best trial that learned every task, with its config.")
    request: dict[str, Any] = Field(default_factory=dict)
    created: float | None = None
    apply_best: bool = False
    applied: bool = Field(False, description="Its best config is the current default for new tasks.")
    cancelled: bool = False


class TuneDefaults(BaseModel):
    config: dict[str, Any] = Field(description="Training config that tasks of its method start from.")
    source: str = Field(description="The search it came from.")
    updated: float | None = None


class TuneList(BaseModel):
    searches: list[TuneView]
    defaults: TuneDefaults | None = None


# OpenAPI request bodies of the routes that parse their own body (streamed uploads, two content types).
ARCHIVE_MEDIA_TYPES = "application/zip, application/x-tar, application/gzip"
"""What a dataset part may be (the server reads its bytes: zip, tar or tar.gz, whatever the part says)."""
DATASET_PART = {"type": "string", "format": "binary",
                "description": "zip, tar or tar.gz of an ImageFolder tree (class folders of images, optional "
                               "train/ and test/ splits)."}

TASK_UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["name", "dataset"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": TASK_NAME_PATTERN,
                     "description": "Task name: not blank, no control characters."},
            "dataset": DATASET_PART,
            "method": {"type": "string", "enum": sorted(METHODS),
                       "description": "The continual-learning method (default: the service's)."},
            "config": {**inline_schema(TaskConfig), "description": "JSON object (a part of type application/json) "
                       "of the training settings a client may choose, e.g. {\"steps\": 100}."},
            "base_version": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "enum": ["active"]}],
                             "description": "The stored version to train from (404 if there is none), or \"active\" "
                                            "(the active version now). Left out: the active version when the job "
                                            "starts (activation auto) or the newest version that passed the "
                                            "quality gate (activation manual), so each version holds every task "
                                            "learned before it."},
        },
    }, "encoding": {"config": {"contentType": "application/json"}, "dataset": {"contentType": ARCHIVE_MEDIA_TYPES}}}},
}

def classify_body(settings: ServiceSettings) -> dict[str, Any]:
    """The classify request body as OpenAPI states it, with the limits `settings` enforce."""
    pixels = (f"Each image at most {settings.max_classify_pixels} pixels (width x height, "
              "max_classify_pixels), PNG, JPEG, WebP, BMP or GIF (first frame).")
    images = {"minItems": 1, "maxItems": settings.max_classify_images,
              "description": f"1 to {settings.max_classify_images} images (max_classify_images). {pixels}"}
    label = {"type": "string", "minLength": 1, "maxLength": settings.max_label_chars, "pattern": TASK_NAME_PATTERN,
             "description": f"1 to {settings.max_label_chars} characters (max_label_chars), not all blank, "
                            "without control characters."}
    labels = {"type": "array", "items": label, "minItems": 1, "maxItems": settings.max_labels, "uniqueItems": True,
              "description": f"1 to {settings.max_labels} distinct candidate class names (max_labels); "
                             "scores are over these labels."}
    json_schema = ClassifyRequest.model_json_schema()
    json_schema["properties"]["images"].update(images)
    json_schema["properties"]["labels"].update(labels)
    json_schema["description"] = f"At most {settings.max_classify_bytes} bytes in all (max_classify_bytes)."
    return {
        "required": True,
        "content": {
            "application/json": {"schema": json_schema},
            "multipart/form-data": {"schema": {
                "type": "object",
                "required": ["images", "labels"],
                "description": json_schema["description"],
                "properties": {
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}, **images},
                    "labels": {**labels, "description": labels["description"] +
                               " Repeat the field once per label (or send one JSON list)."},
                    "model_version": {"type": "integer"},
                },
            }},
        },
    }


class ClassifyExtra(Mapping):
    """The classify operation's OpenAPI extras, made when the document is built, from the settings
    the running service stated (`state_classify_limits`; the defaults until then). A mapping rather
    than a dict because Serve's ingress serves a frozen copy of the app, made before any settings
    exist: this object's class, and the module state it reads, are the replica's own."""

    def __getitem__(self, key: str) -> Any:
        if key != "requestBody":
            raise KeyError(key)
        return classify_body(_stated[0])

    def __iter__(self) -> Iterator[str]:
        return iter(("requestBody",))

    def __len__(self) -> int:
        return 1


_stated = [ServiceSettings()]
CLASSIFY_EXTRA = ClassifyExtra()


def state_classify_limits(settings: ServiceSettings) -> None:
    """Make the OpenAPI document of this process state `settings`' classify limits."""
    _stated[0] = settings



def _tune_json_schema() -> dict[str, Any]:
    """TuneBody for a JSON request: with no dataset to upload, `tasks` must name at least one task."""
    schema = inline_schema(TuneBody)
    schema["required"] = ["tasks"]
    schema["properties"]["tasks"]["minItems"] = 1
    return schema


TUNE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _tune_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["dataset"],
                "properties": {
                    "request": {**inline_schema(TuneBody),
                                "description": "The search (as for application/json; `tasks` may be empty: the "
                                               "dataset is a task)."},
                    "dataset": {**DATASET_PART, "description": "The task to tune for: " + DATASET_PART["description"]},
                },
            },
            "encoding": {"request": {"contentType": "application/json"},
                         "dataset": {"contentType": ARCHIVE_MEDIA_TYPES}},
        },
    },
}

# OpenAPI links: what a client (or a stateful fuzzer) does next with an answer's ids.
TASK_LINKS = {
    "GetTask": {"operationId": "getTask", "parameters": {"task_id": "$response.body#/task_id"},
                "description": "Follow the job: status, progress, the version it produced."},
    "CancelTask": {"operationId": "cancelTask", "parameters": {"task_id": "$response.body#/task_id"},
                   "description": "Cancel the job."},
    "Classify": {"operationId": "classify", "description": "Classify with the active version."},
}
TASK_VIEW_LINKS = {
    "ClassifyWithVersion": {"operationId": "classify", "requestBody": {"model_version": "$response.body#/model_version"},
                            "description": "Classify with the version this job produced (null: the active one)."},
    "CancelTask": TASK_LINKS["CancelTask"],
}
SEARCH_LINKS = {
    "GetSearch": {"operationId": "getSearch", "parameters": {"job_id": "$response.body#/job_id"},
                  "description": "Follow the search: status, progress, trials table, best trial."},
    "CancelSearch": {"operationId": "cancelSearch", "parameters": {"job_id": "$response.body#/job_id"},
                     "description": "Cancel the search."},
    "ApplySearch": {"operationId": "applySearch", "parameters": {"job_id": "$response.body#/job_id"},
                    "description": "Make its best config the default for new tasks (once it has one)."},
}
