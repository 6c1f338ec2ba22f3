"""The REST API: a FastAPI app served by a Ray Serve ingress deployment, and the app builders.

    proxy ── /v1/classify ──▶  Classifier (its own application: versions, batched forwards)
          ── everything else ──▶  Ingress (this module) ── handles ──▶  JobRunner (one replica:
                                                                     job queue, store writes)

The service is two Serve applications: the API (`build_app`: Ingress and JobRunner, at /) and
the classifier (`build_classify_app`, at /v1/classify), so a classify request reaches the process
holding the model in one hop. The ingress streams uploads to local disk, validates them and puts
them in the store before the job runner sees a path, and keeps the whole OpenAPI document.
`deploy_service` runs both; `args` of the builders are ServiceSettings fields, as in
`deploy/serve_config.yaml`.

No `from __future__ import annotations` here: FastAPI must see the route signatures' real types
through Serve's class-based view.
"""

import logging
import time
from pathlib import Path
from typing import Annotated, Any, Awaitable

import fastapi
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import RunTarget
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from gnsp_core.errors import GnspError
from gnsp_core.models import recommended_training

from service.api import auth
from service.api import metrics as prometheus
from service.api import schemas as api
from service.jobs.runner import JobRunner
from service.api.http_errors import install_error_handlers
from service.serving.applications import DEPLOY_TIMEOUT_S, run_applications
from service.serving.classifier import Classifier
from service.serving.classify_http import CLASSIFY_ROUTE, classifier_handle, classify_app_name, server_timing
from service.errors import BadRequestError, NotReadyError, UnknownVersionError, hide_dirs, unwrap
from service.api.task_config import check_method, parse_base_version
from service.jobs.tasks import TASK_ID_PATTERN, new_task_id
from service.tuning.searches import SEARCH_ID_PATTERN, new_search_id
from service.api.metrics import MetricsMiddleware
from service.settings import ServiceSettings
from service.store import ModelStore
from service.api.uploads import (UploadGate, archive_filename, check_task_name, parse_config, parse_tune_body,
                                 read_body, read_classify_request, received_dataset_form, validate_dataset)


class GnspAPI(FastAPI):
    """The FastAPI app, whose OpenAPI document states the bearer scheme only where a token is required."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = auth.document_security(super().openapi())
        return self.openapi_schema


app = GnspAPI(title="gnsp", version="0.1.0",
              description="Continual learning for CLIP: add tasks, follow jobs, query versioned zero-shot classifiers.")
install_error_handlers(app)
app.add_middleware(MetricsMiddleware)
# Every route that changes the service: the router's dependency is copied onto each route as it is
# declared, so it stays when Serve moves the class's routes onto its own router.
writes = APIRouter(dependencies=[Depends(auth.require_token)])
app.include_router(writes)
log = logging.getLogger(__name__)
INGRESS_MAX_ONGOING = 256
ERRORS = {status: {"model": api.ErrorResponse} for status in (400, 401, 404, 408, 409, 413, 415, 422, 429)}
TaskId = Annotated[str, fastapi.Path(pattern=TASK_ID_PATTERN, description="As POST /v1/tasks returned it.")]
SearchId = Annotated[str, fastapi.Path(pattern=SEARCH_ID_PATTERN, description="As POST /v1/tune returned it.")]
Version = Annotated[int, fastapi.Path(ge=1, description="A stored model version (GET /v1/models lists them).")]


def with_links(status: int, links: dict[str, Any]) -> dict[int, Any]:
    """The error answers plus the OpenAPI links of the success answer."""
    return {**ERRORS, status: {"links": links}}


async def call(response: Awaitable[Any]) -> Any:
    """Await a deployment call, re-raising a user error from the other replica as itself."""
    try:
        return await response
    except Exception as exc:
        cause = unwrap(exc)
        if isinstance(cause, GnspError):
            raise cause from None
        raise


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, settings: ServiceSettings, jobs: DeploymentHandle) -> None:
        self.settings, self.jobs = settings, jobs
        auth.use_settings(settings)
        hide_dirs(settings.store, settings.work_dir)
        self.store = ModelStore.open(settings.store)
        self.uploads = UploadGate(settings.max_concurrent_uploads, settings.upload_slot_wait_s)
        api.state_classify_limits(settings)

    # --- service ---------------------------------------------------------------------------------

    @app.get("/healthz", response_model=api.Health, operation_id="health",
             responses={503: {"model": api.Health, "description": "no model version is active yet"}})
    async def healthz(self) -> Response:
        """The readiness probe: 503 until a version is active; which service is the store's writer."""
        active = await run_in_threadpool(self.store.active)
        role = await call(self.jobs.role.remote())
        health = api.Health(status="ok" if active is not None else "starting", active_version=active,
                            role=role["role"], lease_holder=role["lease_holder"], primed=role["primed"])
        return JSONResponse(health.model_dump(), status_code=200 if active is not None else 503)

    @app.get("/metrics", response_class=Response, operation_id="metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
             dependencies=[Depends(auth.require_metrics_token)])
    async def metrics(self) -> Response:
        counts = await call(self.jobs.counts.remote())
        body, content_type = prometheus.render_gauges(counts, await run_in_threadpool(self.store.active))
        return Response(body, media_type=content_type)

    # --- tasks -----------------------------------------------------------------------------------

    @writes.post("/v1/tasks", status_code=202, response_model=api.TaskAccepted, operation_id="addTask",
                 responses=with_links(202, api.TASK_LINKS), openapi_extra={"requestBody": api.TASK_UPLOAD_BODY})
    async def add_task(self, request: Request) -> api.TaskAccepted:
        """Upload a dataset (streamed, size-limited, validated) and queue a job that learns it."""
        async with received_dataset_form(request, self.settings, self.uploads) as form:
            name = check_task_name(form.fields.get("name"))
            if form.file is None:
                raise BadRequestError("the form has no 'dataset' file; attach a .zip or .tar.gz of class folders")
            config = parse_config(form.fields.get("config"))
            chosen = (form.fields.get("method") or "").strip()
            method = check_method(chosen) if chosen else config.pop("method", None) or self.settings.default_method
            config.pop("method", None)
            base = parse_base_version(form.fields.get("base_version"))
            base = await run_in_threadpool(self._base_version, base) if base is not None else None
            await call(self.jobs.check_config.remote(method, config, name))
            summary = await self.uploads.run(validate_dataset, form.file, self.settings.archive_limits(),
                                             self.settings.scratch())
            return await self._queue(name, method, config, form.file, summary, base)

    def _base_version(self, requested: int | str) -> int:
        """The version a task's request names to train from: `active` (now) or a stored version."""
        if requested == "active":
            active = self.store.active()
            if active is None:
                raise NotReadyError("the service has no active model version yet; retry shortly")
            return active
        if not self.store.has_version(int(requested)):
            raise UnknownVersionError(f"base_version {requested} does not exist; GET /v1/models lists the versions")
        return int(requested)

    async def _queue(self, name: str, method: str, config: dict, archive: Path, summary: dict,
                     base: int | None) -> api.TaskAccepted:
        task_id = new_task_id()
        upload = await run_in_threadpool(self.store.put_upload, task_id, archive, archive_filename(archive))
        try:
            record = await call(self.jobs.submit.remote(task_id, name, method, config, upload, summary, base))
        except BaseException:
            await run_in_threadpool(self.store.delete_job_files, task_id)
            raise
        return api.TaskAccepted(task_id=record["task_id"], status=record["status"], warnings=record["warnings"])

    @app.get("/v1/tasks", response_model=api.TaskList, operation_id="listTasks")
    async def list_tasks(self) -> api.TaskList:
        return api.TaskList(tasks=[api.TaskView(**r) for r in await call(self.jobs.list.remote())])

    @app.get("/v1/tasks/{task_id}", response_model=api.TaskView, operation_id="getTask",
             responses=with_links(200, api.TASK_VIEW_LINKS))
    async def get_task(self, task_id: TaskId) -> api.TaskView:
        return api.TaskView(**await call(self.jobs.get.remote(task_id)))

    @writes.delete("/v1/tasks/{task_id}", response_model=api.TaskView, operation_id="cancelTask", responses=ERRORS)
    async def cancel_task(self, task_id: TaskId) -> api.TaskView:
        """Cancel: a queued job never runs; a running job's trainer is stopped. The job's record stays
        (GET shows it `cancelled`); the answer comes once the job has ended, or after 5 s with
        `cancel_requested` set."""
        return api.TaskView(**await call(self.jobs.cancel.remote(task_id)))

    # --- searches (Ray Tune) ---------------------------------------------------------------------

    @writes.post("/v1/tune", status_code=202, response_model=api.TuneView, operation_id="startSearch",
                 responses=with_links(202, api.SEARCH_LINKS), openapi_extra={"requestBody": api.TUNE_BODY})
    async def start_search(self, request: Request) -> api.TuneView:
        """Queue a Ray Tune search of GNSP's threshold, CD/MAP weights and learning rate (JSON, or
        multipart with a `request` JSON field and a `dataset` archive to tune for)."""
        kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if kind != "multipart/form-data":
            body = parse_tune_body(await read_body(request, 1 << 20, self.settings.body_idle_timeout_s))
            return api.TuneView(**await call(self.jobs.submit_search.remote(body, None)))
        async with received_dataset_form(request, self.settings, self.uploads) as form:
            body = parse_tune_body(form.fields.get("request"))
            if form.file is None:
                raise BadRequestError("the form has no 'dataset' file; attach a .zip or .tar.gz of class folders, "
                                      "or send a search of built-in tasks as application/json")
            await self.uploads.run(validate_dataset, form.file, self.settings.archive_limits(), self.settings.scratch())
            upload = await run_in_threadpool(self.store.put_upload, new_search_id(), form.file,
                                             archive_filename(form.file))
            return api.TuneView(**await call(self.jobs.submit_search.remote(body, upload)))

    @app.get("/v1/tune", response_model=api.TuneList, operation_id="listSearches")
    async def list_searches(self) -> api.TuneList:
        return api.TuneList(**await call(self.jobs.searches_list.remote()))

    @app.get("/v1/tune/{job_id}", response_model=api.TuneView, operation_id="getSearch", responses=ERRORS)
    async def get_search(self, job_id: SearchId) -> api.TuneView:
        return api.TuneView(**await call(self.jobs.search.remote(job_id)))

    @writes.delete("/v1/tune/{job_id}", response_model=api.TuneView, operation_id="cancelSearch", responses=ERRORS)
    async def cancel_search(self, job_id: SearchId) -> api.TuneView:
        """Cancel: a queued search never starts; a running one stops its trials. Its record and
        results stay (GET shows it `cancelled`); the answer comes once it has ended, or after 5 s."""
        return api.TuneView(**await call(self.jobs.cancel_search.remote(job_id)))

    @writes.post("/v1/tune/{job_id}/apply", response_model=api.TuneDefaults, operation_id="applySearch",
                 responses=ERRORS)
    async def apply_search(self, job_id: SearchId) -> api.TuneDefaults:
        """Make the search's best config the default training config of tasks submitted later."""
        return api.TuneDefaults(**await call(self.jobs.apply_search.remote(job_id)))

    # --- classification --------------------------------------------------------------------------

    @app.post(CLASSIFY_ROUTE, response_model=api.ClassifyResponse, operation_id="classify", responses=ERRORS,
              openapi_extra=api.CLASSIFY_EXTRA)
    async def classify(self, request: Request, response: Response) -> api.ClassifyResponse:
        """Zero-shot scores of each image over the given labels, from the active or a pinned version.

        Deployed with `deploy_service` (or the Serve config), the classifier replicas answer this
        route themselves (Serve routes /v1/classify to their application); this handler answers
        it only where the API application runs alone, through the classifier's handle."""
        start = time.perf_counter()
        images, labels, pinned = await read_classify_request(request, self.settings)
        answer = await call(classifier_handle().answer.remote(images, labels, pinned))
        response.headers["Server-Timing"] = server_timing(answer.pop("timing"), 1000 * (time.perf_counter() - start))
        return api.ClassifyResponse(**answer)

    # --- versions --------------------------------------------------------------------------------

    @app.get("/v1/models", response_model=api.ModelList, operation_id="listModels")
    async def list_models(self) -> api.ModelList:
        return await run_in_threadpool(self._model_list)

    def _model_list(self) -> api.ModelList:
        pointer = self.store.pointer()
        models = [self._model_view(v, pointer.get("version")) for v in self.store.versions()]
        return api.ModelList(active_version=pointer.get("version"), models=models, history=pointer.get("history", []))

    def _model_view(self, version: int, active: int | None) -> api.ModelView:
        manifest = self.store.manifest(version)
        fields = {k: manifest.get(k) for k in ("created", "parent", "task", "task_id", "method", "spec")}
        return api.ModelView(version=version, active=version == active, tasks=manifest.get("tasks") or [],
                             metrics=manifest.get("metrics") or {}, gate=manifest.get("gate") or {},
                             recommended_training=recommended_training((manifest.get("spec") or {}).get("name")),
                             **fields)

    @app.get("/v1/models/{version}", response_model=api.ModelView, operation_id="getModel", responses=ERRORS)
    async def get_model(self, version: Version) -> api.ModelView:
        return await run_in_threadpool(lambda: self._model_view(version, self.store.active()))

    @writes.post("/v1/models/{version}/activate", response_model=api.ActivationResponse,
                 operation_id="activateModel", responses=ERRORS)
    async def activate(self, version: Version) -> api.ActivationResponse:
        """Make a stored version active (rollback or pin) after the classifier loaded and checked it."""
        previous = await run_in_threadpool(self.store.active)
        pointer = await call(self.jobs.activate.remote(version, "activated through the API"))
        return api.ActivationResponse(active_version=pointer["version"], previous_version=previous)


def build_app(args: dict[str, Any] | ServiceSettings | None = None) -> serve.Application:
    """The API application: Ingress -> JobRunner. `args` are ServiceSettings fields."""
    settings = _settings(args)
    settings.check_exposure(serve_http_host())
    jobs = JobRunner.options(ray_actor_options={"num_cpus": 0}).bind(settings)
    # The ingress only awaits the other deployments: let it hold many requests, or the proxy queues
    # and retries them with back-off (Serve's default of 5 per replica).
    return Ingress.options(num_replicas=settings.ingress_replicas, ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=INGRESS_MAX_ONGOING).bind(settings, jobs)


def build_classify_app(args: dict[str, Any] | ServiceSettings | None = None) -> serve.Application:
    """The classifier application, routed at /v1/classify. `args` are ServiceSettings fields."""
    settings = _settings(args)
    settings.check_exposure(serve_http_host())
    return Classifier.options(
        ray_actor_options={"num_cpus": settings.classifier_cpus, "num_gpus": settings.classifier_gpus},
        max_ongoing_requests=settings.classifier_max_ongoing, **_replicas(settings)).bind(settings)


def deploy_service(settings: ServiceSettings, name: str = "gnsp", logging_config: dict[str, Any] | None = None,
                   timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Run the service on the connected Ray as two Serve applications: `name` at / and its
    classifier at /v1/classify, deployed together (a classifier replica reads the store's active
    version when a request comes, so it may start before the job runner has written version 1 to
    an empty store), both running within `timeout_s` or a ServiceFault that says what Serve is
    waiting for."""
    run_applications([RunTarget(build_app(settings), name=name, route_prefix="/", logging_config=logging_config),
                      RunTarget(build_classify_app(settings), name=classify_app_name(name),
                                route_prefix=CLASSIFY_ROUTE, logging_config=logging_config)], timeout_s)


def delete_service(name: str = "gnsp") -> None:
    """Remove both applications of `deploy_service(..., name)`."""
    serve.delete(classify_app_name(name))
    serve.delete(name)


def _settings(args: dict[str, Any] | ServiceSettings | None) -> ServiceSettings:
    settings = args if isinstance(args, ServiceSettings) else ServiceSettings(**(args or {}))
    return settings.with_token_from_env()


def serve_http_host() -> str | None:
    """The address Serve's HTTP proxies listen on when Serve already runs on the Ray this process is
    connected to (`serve run config.yaml` starts it before building the app); None when it will be
    started later, by `serve.run` with its default of 127.0.0.1."""
    import ray
    from ray.serve.context import _get_global_client

    if not ray.is_initialized():
        return None
    client = _get_global_client(raise_if_no_controller_running=False)
    return client.http_config.host if client is not None else None


def _replicas(settings: ServiceSettings) -> dict[str, Any]:
    if settings.classifier_replicas == "auto":
        return {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": settings.classifier_min_replicas, "max_replicas": settings.classifier_max_replicas}}
    return {"num_replicas": settings.classifier_replicas}
