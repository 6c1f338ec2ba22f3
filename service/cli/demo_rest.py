"""`gnsp demo` through the service: local Ray + Serve on 127.0.0.1, tasks added over the REST API.

Each method learns the same tasks from the pre-trained version (re-activated before each method's
sequence). Task accuracies come over HTTP: just after learning from the job's metrics (the
service's own measure on the uploaded test split), at the end from POST /v1/classify pinned to the
version. Held-out accuracy and retrieval come from the version's metrics when the service reports
them, else (and the modality gap always, which the REST API does not report) they are measured here
on the version's state read from the store; the table's footnote says which.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import tempfile
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import torch
from tqdm import tqdm

from gnsp_core.data import Task, load_task, to_rgb
from gnsp_core.data.folders import write_image_folder
from gnsp_core.data.heldout import PAIRS_NAME, HeldoutSuite, load_heldout_suite
from gnsp_core.models import DEFAULT_MODEL

from service.cli.arguments import task_sources
from service.cli.build_default import build_default_with_bar
from service.cli.demo_measure import Measures, modality_gap, suite_items, zero_shot
from service.cli.demo_service import DemoError, check, local_service, wait_ready
from service.cli.demo_table import MethodRun, chance_levels, print_story
from service.jobs.states import ENDED

REF_BATCH_SIZE = 32
CLASSIFY_BATCH = 32
CLASSIFY_BATCH_BYTES = 8 * 1024**2
HELDOUT_METRIC = "heldout_accuracy"
RETRIEVAL_METRICS = {"R@1": "retrieval_r1", "R@5": "retrieval_r5"}


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
        return check(client.post("/v1/tasks", data=data, files=files))["task_id"]


def follow_job(client: httpx.Client, task_id: str, name: str, poll_s: float = 0.25) -> dict[str, Any]:
    """Poll the job with a progress bar until it ends; Ctrl-C cancels it. Returns the final record."""
    bar = tqdm(total=100, desc=f"learning {name}", unit="%", dynamic_ncols=True)
    try:
        while True:
            record = check(client.get(f"/v1/tasks/{task_id}"))
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


def learn_tasks(client: httpx.Client, tasks: list[Task], method: str, config: dict[str, Any],
                archives: dict[str, Future[Path]]) -> tuple[dict[str, float], int]:
    """Add each task in turn (its upload from `archives`) and wait for its job: each task's accuracy
    just after it was learned (the job's own measure), and the version the last job produced."""
    learned: dict[str, float] = {}
    version = 0
    for task in tasks:
        task_id = submit_task(client, task.name, archives[task.name].result(), method, config)
        record = follow_job(client, task_id, f"{method} · {task.name}")
        if record["status"] != "succeeded":
            raise DemoError(f"the job learning {task.name} with {method} ({task_id}) ended {record['status']}: "
                            f"{record.get('error') or record.get('note') or 'no error reported'}")
        version = int(record["model_version"])
        accuracy = (record.get("metrics") or {}).get("task_accuracy")
        learned[task.name] = float(accuracy) if accuracy is not None else rest_accuracy(client, task, version)
        print(f"  {method} learned {task.name}: {learned[task.name]:.1f} % on its test split (version {version})",
              flush=True)
    return learned, version


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
        answer = check(client.post("/v1/classify", json=body))
        if answer["model_version"] != version:
            raise DemoError(f"asked version {version}, answered by {answer['model_version']}")
        predictions += [r["label"] for r in answer["results"]]
    truth = [task.classnames[y] for y in task.test.labels]
    return 100.0 * sum(p == t for p, t in zip(predictions, truth)) / max(1, len(truth))


def measure_version(client: httpx.Client, store: str, version: int, tasks: list[Task], suite: HeldoutSuite,
                    reference_gap: torch.Tensor | None = None) -> Measures:
    """A table column: task accuracy over REST, held-out and retrieval from the version's metrics when
    it has them, the rest measured here on the stored state."""
    metrics = check(client.get(f"/v1/models/{version}")).get("metrics") or {}
    has_heldout = isinstance(metrics.get(HELDOUT_METRIC), (int, float))  # the service scores the same held-out data
    has_retrieval = all(isinstance(metrics.get(k), (int, float)) for k in RETRIEVAL_METRICS.values())
    # The tasks' requests at once (the classifier batches them) and the local part beside them.
    with ThreadPoolExecutor(len(tasks) + 1, thread_name_prefix="measure") as pool:
        state = pool.submit(_measure_state, store, version, suite, reference_gap, not (has_heldout and has_retrieval))
        accuracies = {t.name: pool.submit(rest_accuracy, client, t, version) for t in tasks}
        measures = Measures(tasks={name: future.result() for name, future in accuracies.items()})
        local = state.result()
    if has_heldout:
        measures.heldout, measures.sources["held-out"] = float(metrics[HELDOUT_METRIC]), "the version's metrics"
    if has_retrieval:
        measures.retrieval = {name: float(metrics[k]) for name, k in RETRIEVAL_METRICS.items()}
        measures.sources["retrieval"] = "the version's metrics"
    measures.gap, measures.gap_vector = local["gap"], local["gap_vector"]
    measures.sources["gap"] = "measured here"
    if measures.heldout is None:
        measures.heldout, measures.sources["held-out"] = local["heldout"], "measured here"
    if measures.retrieval is None and local["retrieval"] is not None:
        measures.retrieval, measures.sources["retrieval"] = local["retrieval"], "measured here"
    return measures


def _measure_state(store: str, version: int, suite: HeldoutSuite, reference_gap: torch.Tensor | None,
                   whole_suite: bool) -> dict[str, Any]:
    """The modality gap of the stored version, and the suite's accuracy and retrieval when
    `whole_suite` (the version's metrics lack them): the suite's hundreds of images are the bulk
    of a measure, and the service already ran them."""
    from gnsp_core.state import ContinualState
    from service.store import ModelStore
    from service.versions import load_state_model

    with tempfile.TemporaryDirectory(prefix="gnsp-demo-version-") as cache:
        loaded = load_state_model(ContinualState.load(ModelStore.open(store).fetch_version(version, Path(cache))))
        if whole_suite:
            return zero_shot(loaded, suite, "cpu", reference_gap)
        return {"heldout": None, "retrieval": None, **modality_gap(loaded, suite, "cpu", reference_gap)}


# --- the command -----------------------------------------------------------------------------------


def demo_settings(args: argparse.Namespace, store: str, work: Path) -> Any:
    """Service settings of the demo: training in the job runner's process (one machine: no worker
    group to start per job, see service.training.local_run), the quality gate off (the table shows
    the drop)."""
    from service.settings import ServiceSettings

    return ServiceSettings(store=store, model=args.model, pretrained=args.pretrained, workers=0,
                           reference=args.reference, default_method="gnsp", heldout="builtin",
                           max_heldout_drop=100.0, work_dir=str(work))


def learn_each_method(client: httpx.Client, methods: list[str], base: int, tasks: list[Task], config: dict[str, Any],
                      archives: dict[str, Future[Path]], aside: ThreadPoolExecutor,
                      measure: Callable[[int], Measures]) -> dict[str, MethodRun]:
    """Each method learns the tasks from the base version in turn. A method's last version is
    measured `aside` while the next method learns: the table needs it only at the end."""
    ended: dict[str, tuple[dict[str, float], int, Future[Measures]]] = {}
    for method in methods:
        check(client.post(f"/v1/models/{base}/activate"))  # every method starts from the pre-trained weights
        learned, final = learn_tasks(client, tasks, method, config, archives)
        print(f"  measuring {method}'s version {final} ...", flush=True)
        ended[method] = (learned, final, aside.submit(measure, final))
    return {method: MethodRun(learned, measures.result(), final)
            for method, (learned, final, measures) in ended.items()}


def run_rest_demo(args: argparse.Namespace, methods: list[str]) -> int:
    """The demo through the REST service; exit code 0 when every job succeeded."""
    start = time.perf_counter()
    caps = dict(max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class)
    tasks = [load_task(s, **caps) for s in task_sources(args.tasks)]
    if not tasks:
        raise DemoError("--tasks names no task")
    suite = load_heldout_suite()
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None}
    config = {"ref_batch_size": REF_BATCH_SIZE, **overrides}  # the rest: the service's defaults for its model
    model = args.model or DEFAULT_MODEL
    with tempfile.TemporaryDirectory(prefix="gnsp-demo-") as tmp, ThreadPoolExecutor(1, "demo-aside") as aside:
        work = Path(tmp)
        archives = {task.name: aside.submit(task_zip, task, work) for task in tasks}  # while the service starts
        store = args.store or str(work / "store")
        if args.model is None and args.store is None:  # build here, with a bar, not silently in a replica
            build_default_with_bar()
        print(f"starting local Ray and the service ({model}, store {store}) ...", flush=True)
        with local_service(demo_settings(args, store, work)) as url, httpx.Client(base_url=url, timeout=600) as client:
            base = wait_ready(client)
            print(f"service on {url}; measuring the pre-trained version {base} ...", flush=True)
            pretrained = measure_version(client, store, base, tasks, suite)
            runs = learn_each_method(client, methods, base, tasks, config, archives, aside,
                                     lambda v: measure_version(client, store, v, tasks, suite, pretrained.gap_vector))
    print_story(model, [t.name for t in tasks], chance_levels(tasks, suite), pretrained, runs, suite_items(suite),
                suite.sizes[PAIRS_NAME])
    versions = ", ".join(f"{m} {r.version}" for m, r in runs.items())
    sources = "; ".join(f"{k} from {v}" for k, v in pretrained.sources.items())
    print(f"\nversions: pre-trained {base}, {versions}. Task accuracy through POST /v1/classify (learned: the "
          f"job's metrics); {sources}.")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0
