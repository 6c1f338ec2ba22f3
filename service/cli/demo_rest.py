"""`gnsp demo` through the service: local Ray + Serve on 127.0.0.1, tasks added over the REST API.

Everything the table shows comes over HTTP (uploads, job progress, POST /v1/classify pinned to a
version), except the modality gap: the REST API has no gap endpoint, so unless a version's metrics
report one, it is measured here on the version's state read from the store.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import httpx
import torch
from tqdm import tqdm

from gnsp_core.data import Task, load_task, to_rgb
from gnsp_core.data.folders import write_image_folder
from gnsp_core.errors import GnspError
from gnsp_core.evaluation import class_prompt_gap
from gnsp_core.models import DEFAULT_MODEL
from gnsp_core.data.heldout import load_heldout_suite

from service.cli.arguments import task_sources
from service.cli.build_default import build_default_with_bar
from service.cli.demo_table import chance_levels, print_table
from service.jobs.states import ENDED

APP_NAME = "gnsp-demo"
REF_BATCH_SIZE = 32
CLASSIFY_BATCH = 32
CLASSIFY_BATCH_BYTES = 8 * 1024**2
GAP_METRIC_KEYS = ("modality_gap_norm", "modality_gap", "gap_norm")


class DemoError(GnspError):
    """The demo could not finish: a job failed or the service answered with an error."""

    code = "demo_failed"


# --- the service -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_service(settings: Any) -> Iterator[str]:
    """Start (or join) Ray, deploy the app on 127.0.0.1; yields the base URL. Only what it started it stops."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from service.api.app import delete_service, deploy_service

    own_ray = not ray.is_initialized()
    if own_ray:
        # Worker logs stay in Ray's log folder: the demo reports progress and errors from the API.
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
        port = _get_global_client().http_config.port  # an already running Serve keeps its own port
        # Quiet replicas: no access log line per progress poll, warnings and errors still show.
        deploy_service(settings, APP_NAME,
                       logging_config={"enable_access_log": False, "log_level": "WARNING"})
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            with contextlib.suppress(Exception):
                delete_service(APP_NAME)
    finally:
        if own_ray:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


def _check(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a successful response; the service's error message otherwise."""
    if response.is_success:
        return response.json()
    try:
        message = response.json()["error"]["message"]
    except Exception:
        message = response.text[:500]
    raise DemoError(f"{response.request.method} {response.request.url.path} -> {response.status_code}: {message}")


def wait_ready(client: httpx.Client, timeout: float = 300) -> int:
    """Wait until the service has an active version (version 1 on a new store); returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            active = client.get("/healthz").json().get("active_version")
            if active is not None:
                return int(active)
        time.sleep(0.5)
    raise DemoError(f"the service had no active model version after {timeout:.0f} s")


# --- tasks over the API ----------------------------------------------------------------------------


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    to_rgb(image).save(buffer, format="PNG")
    return buffer.getvalue()


def task_zip(task: Task, folder: Path) -> Path:
    """Write the task as an ImageFolder (train/ and test/, classes.json keeps the names and templates) and zip it."""
    root = write_image_folder(folder / task.name, task.classnames, {"train": task.train, "test": task.test},
                              task.templates)
    archive = folder / f"{task.name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(root).as_posix())
    return archive


def submit_task(client: httpx.Client, name: str, archive: Path, method: str, config: dict[str, Any]) -> str:
    """POST /v1/tasks; returns the job id."""
    with archive.open("rb") as fh:
        files = {"dataset": (archive.name, fh, "application/zip")}
        data = {"name": name, "method": method, "config": json.dumps(config)}
        return _check(client.post("/v1/tasks", data=data, files=files))["task_id"]


def follow_job(client: httpx.Client, task_id: str, name: str, poll_s: float = 1.0) -> dict[str, Any]:
    """Poll the job with a progress bar until it ends; Ctrl-C cancels it. Returns the final record."""
    bar = tqdm(total=100, desc=f"learning {name}", unit="%", dynamic_ncols=True)
    try:
        while True:
            record = _check(client.get(f"/v1/tasks/{task_id}"))
            bar.n = round(100 * float(record.get("progress") or 0.0))
            bar.set_postfix(status=record["status"], phase=record.get("phase") or "")
            bar.refresh()
            if record["status"] in ENDED:
                return record
            time.sleep(poll_s)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            client.delete(f"/v1/tasks/{task_id}", timeout=20)
        raise
    finally:
        bar.close()


def learn_tasks(client: httpx.Client, tasks: list[Task], method: str, config: dict[str, Any], work: Path) -> int:
    """Add each task in turn and wait for its job; returns the version the last job produced."""
    version = 0
    for task in tasks:
        task_id = submit_task(client, task.name, task_zip(task, work), method, config)
        record = follow_job(client, task_id, task.name)
        if record["status"] != "succeeded":
            raise DemoError(f"the job learning {task.name} ({task_id}) ended {record['status']}: "
                            f"{record.get('error') or record.get('note') or 'no error reported'}")
        version = record["model_version"]
        print(f"  {task.name}: version {version} (active: {record.get('activated')}), "
              f"job metrics {record.get('metrics')}", flush=True)
    return int(version)


# --- measuring a version ---------------------------------------------------------------------------


def _batches(images: list[Any]) -> Iterator[list[str]]:
    """Base64 PNGs in batches of at most CLASSIFY_BATCH images and CLASSIFY_BATCH_BYTES bytes."""
    batch: list[str] = []
    size = 0
    for image in images:
        encoded = base64.b64encode(png_bytes(image)).decode()
        if batch and (len(batch) >= CLASSIFY_BATCH or size + len(encoded) > CLASSIFY_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(encoded)
        size += len(encoded)
    if batch:
        yield batch


def rest_accuracy(client: httpx.Client, task: Task, version: int) -> float:
    """Top-1 (percent) on the task's test split over its own labels, via POST /v1/classify."""
    predictions: list[str] = []
    for batch in _batches(task.test.images):
        body = {"images": batch, "labels": task.classnames, "model_version": version}
        answer = _check(client.post("/v1/classify", json=body))
        if answer["model_version"] != version:
            raise DemoError(f"asked version {version}, answered by {answer['model_version']}")
        predictions += [r["label"] for r in answer["results"]]
    truth = [task.classnames[y] for y in task.test.labels]
    return 100.0 * sum(p == t for p, t in zip(predictions, truth)) / max(1, len(truth))


def version_gap(client: httpx.Client, store: str, version: int, heldout: Task,
                reference: torch.Tensor | None) -> tuple[dict[str, Any], str]:
    """The modality gap of a version: from its metrics if the service reports one, else measured here."""
    metrics = _check(client.get(f"/v1/models/{version}")).get("metrics") or {}
    for key in GAP_METRIC_KEYS:
        if isinstance(metrics.get(key), (int, float)):
            return {"norm": float(metrics[key]), "cosine": None, "gap": None}, f"GET /v1/models/{version} metrics"
    from service.store import ModelStore
    from service.versions import load_state_model
    from gnsp_core.state import ContinualState

    with tempfile.TemporaryDirectory(prefix="gnsp-demo-gap-") as cache:
        state = ContinualState.load(ModelStore.open(store).fetch_version(version, Path(cache)))
        loaded = load_state_model(state)
    return class_prompt_gap(loaded, heldout, "cpu", reference), "measured locally on the stored state"


def snapshot(client: httpx.Client, store: str, version: int, tasks: list[Task], heldout: Task,
             reference: torch.Tensor | None = None) -> dict[str, Any]:
    """New-task accuracy (REST), the held-out suite's numbers (the version's metrics: the service
    measures them for every version) and the modality gap of one version, as print_table wants."""
    accs = {t.name: rest_accuracy(client, t, version) for t in tasks}
    metrics = _check(client.get(f"/v1/models/{version}")).get("metrics") or {}
    if not isinstance(metrics.get("retrieval_r1"), (int, float)):
        raise DemoError(f"version {version} has no held-out suite metrics (the service's heldout must be 'builtin')")
    gap, source = version_gap(client, store, version, heldout, reference)
    return {"tasks": accs, "heldout": metrics["heldout_accuracy"], "retrieval_r1": metrics["retrieval_r1"],
            "gap": gap, "gap_source": source}


# --- the command -----------------------------------------------------------------------------------


def demo_settings(args: argparse.Namespace, store: str, work: Path) -> Any:
    """Service settings of the demo: one training worker, the quality gate off (the table shows the drop)."""
    from service.settings import ServiceSettings

    return ServiceSettings(store=store, model=args.model, pretrained=args.pretrained, workers=1,
                           reference=args.reference, default_method=args.method, heldout="builtin",
                           max_heldout_drop=100.0, work_dir=str(work))


def run_rest_demo(args: argparse.Namespace) -> int:
    """The demo through the REST service; exit code 0 when every job succeeded."""
    start = time.perf_counter()
    caps = dict(max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class)
    tasks = [load_task(s, **caps) for s in task_sources(args.tasks)]
    if not tasks:
        raise DemoError("--tasks names no task")
    suite = load_heldout_suite()
    heldout = suite.photo_tasks[0]  # the modality gap's images
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None}
    config = {"ref_batch_size": REF_BATCH_SIZE, **overrides}  # the rest: the service's defaults for its model
    with tempfile.TemporaryDirectory(prefix="gnsp-demo-") as tmp:
        work = Path(tmp)
        store = args.store or str(work / "store")
        if args.model is None and args.store is None:  # build here, with a bar, not silently in a replica
            build_default_with_bar()
        print(f"starting local Ray and the service ({args.model or DEFAULT_MODEL}, store {store}) ...", flush=True)
        with local_service(demo_settings(args, store, work)) as url, httpx.Client(base_url=url, timeout=600) as client:
            base = wait_ready(client)
            print(f"service on {url}, version {base} active; measuring it ...", flush=True)
            before = snapshot(client, store, base, tasks, heldout)
            final = learn_tasks(client, tasks, args.method, config, work)
            print(f"measuring version {final} ...", flush=True)
            after = snapshot(client, store, final, tasks, heldout, before["gap"].get("gap"))
    chance = chance_levels(tasks, suite)
    print(f"\n{args.method} on {args.model or DEFAULT_MODEL} through the REST service: accuracy (%) of "
          f"version {base} (before) and version {final} (after) learning {', '.join(t.name for t in tasks)}")
    print_table(before, after, chance, suite.sizes)
    print(f"\nsources: task accuracies from POST /v1/classify pinned to versions {base} and {final}; held-out "
          f"suite and retrieval from GET /v1/models/<version> metrics; "
          f"modality gap {before['gap_source']} (before) / {after['gap_source']} (after)")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0
