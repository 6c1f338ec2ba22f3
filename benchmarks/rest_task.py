"""One small task sent to the service with its defaults, as a new user would: how long until it is learned.

Starts a private local Ray with the gnsp service on 127.0.0.1 (gnsp-mini unless `--model` says
otherwise; its recommended training settings; the quality gate on the held-out suite, as `gnsp
serve` runs), uploads a three-class task of about 200 training images (built-in class groups,
written as an ImageFolder zip) with no config, and follows the job; then the next task of
`--tasks` the same way, on the same service. A new service primes its node before its first job
(the reference pairs' and the held-out suite's frozen outputs, ServiceSettings.prime_node): the
first job is sent once `/healthz` says `primed` (the wait is reported), as a user sends a task to a
running service, or at once with `--at-start` (the job then waits for the priming). The table gives
each job's wall time from the POST to `succeeded`, its phases, and the test accuracy it measured.
Target: done within 60 s at >= 80 % test accuracy.

    python benchmarks/rest_task.py [--tasks mnist:0-2,mnist:3-5] [--train-per-class 67] [--at-start] [--out out/rest_task]

Prints a table and writes rest_task.json to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

TARGET_S, TARGET_ACCURACY = 60.0, 80.0


def follow(client: httpx.Client, task_id: str) -> tuple[dict[str, Any], float, dict[str, float]]:
    """Poll a job until it ends: its record, the wall time, and when each phase was first seen."""
    from service.cli.demo_service import check

    started, seen = time.perf_counter(), {}
    while True:
        record = check(client.get(f"/v1/tasks/{task_id}"))
        seen.setdefault(record.get("phase") or record["status"], round(time.perf_counter() - started, 1))
        if record["status"] in ("succeeded", "failed", "cancelled"):
            return record, time.perf_counter() - started, seen
        time.sleep(0.25)


def wait_primed(client: httpx.Client, timeout: float = 600) -> float:
    """Wait until the service has primed its node for jobs (GET /healthz `primed`); returns the wait."""
    started = time.perf_counter()
    while not client.get("/healthz").json().get("primed"):
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"the service had not primed its node after {timeout:.0f} s")
        time.sleep(0.5)
    return time.perf_counter() - started


def job_row(task, record: dict[str, Any], wall: float, seen: dict[str, float], order: int) -> dict[str, Any]:
    metrics = record.get("metrics") or {}
    accuracy = metrics.get("task_accuracy")
    return {"job": order, "task": task.name, "classes": len(task.classnames), "train_images": len(task.train.labels),
            "test_images": len(task.test.labels), "status": record["status"], "wall_s": round(wall, 1),
            "phases_first_seen_s": seen, "task_accuracy": accuracy, "metrics": metrics,
            "target_met": record["status"] == "succeeded" and wall <= TARGET_S
            and accuracy is not None and accuracy >= TARGET_ACCURACY}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from gnsp_core.data import load_task
    from gnsp_core.models import DEFAULT_MODEL
    from service.cli.build_default import build_default_with_bar
    from service.cli.demo_rest import submit_task, task_zip
    from service.cli.demo_service import check, local_service, wait_ready
    from service.settings import ServiceSettings

    if args.model is None:
        build_default_with_bar()
    tasks = [load_task(source, max_train_per_class=args.train_per_class, max_test_per_class=args.test_per_class)
             for source in args.tasks.split(",")]
    jobs = []
    with tempfile.TemporaryDirectory(prefix="gnsp-rest-task-") as tmp:
        work = Path(tmp)
        settings = ServiceSettings(store=str(work / "store"), model=args.model, work_dir=str(work / "scratch"))
        with local_service(settings) as url, httpx.Client(base_url=url, timeout=600) as client:
            wait_ready(client)
            primed_s = None if args.at_start else round(wait_primed(client), 1)
            model = check(client.get("/v1/models/1"))
            for order, task in enumerate(tasks, 1):
                task_id = submit_task(client, task.name, task_zip(task, work / f"upload-{order}"),
                                      settings.default_method, {})
                jobs.append(job_row(task, *follow(client, task_id), order))
    return {"model": args.model or DEFAULT_MODEL, "method": settings.default_method, "primed_s": primed_s,
            "training": model["recommended_training"], "jobs": jobs,
            "target_met": all(job["target_met"] for job in jobs)}


def table(result: dict[str, Any]) -> str:
    lines = ["| job | model | task | train / test images | method | status | wall s (POST to done) | "
             "test accuracy % | target |", "|---:|---|---|---|---|---|---:|---:|---|"]
    for job in result["jobs"]:
        accuracy = job["task_accuracy"]
        lines.append(f"| {job['job']} | {result['model']} | {job['task']} ({job['classes']} classes) | "
                     f"{job['train_images']} / {job['test_images']} | {result['method']} | {job['status']} | "
                     f"{job['wall_s']} | {'-' if accuracy is None else f'{accuracy:.1f}'} | "
                     f"{'met' if job['target_met'] else 'missed'} (<= {TARGET_S:g} s, >= {TARGET_ACCURACY:g} %) |")
    lines.append("")
    for job in result["jobs"]:
        lines.append(f"job {job['job']} phases: " + ", ".join(f"{name} at {s} s"
                                                             for name, s in job["phases_first_seen_s"].items()))
    lines.append(f"training settings: {json.dumps(result['training'])}")
    if result["primed_s"] is not None:
        lines.append(f"the first job was sent once the service had primed its node ({result['primed_s']} s after it "
                     "had a version)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="open_clip name or 'tiny'; left out: gnsp-mini")
    parser.add_argument("--tasks", default="mnist:0-2,mnist:3-5",
                        help="task sources, one job each, in order (default: digits 0-2, then 3-5)")
    parser.add_argument("--train-per-class", type=int, default=67, help="training images per class (about 200 in all)")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--at-start", action="store_true",
                        help="send the first job as soon as the service has a version, before it primed its node")
    parser.add_argument("--out", type=Path, default=Path("out/rest_task"))
    args = parser.parse_args()
    result = run(args)
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rest_task.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out / 'rest_task.json'}")


if __name__ == "__main__":
    main()
