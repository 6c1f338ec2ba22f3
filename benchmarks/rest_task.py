"""One small task sent to the service with its defaults, as a new user would: how long until it is learned.

Starts a private local Ray with the gnsp service on 127.0.0.1 (gnsp-mini unless `--model` says
otherwise; its recommended training settings; the quality gate on the held-out suite, as `gnsp
serve` runs), uploads a three-class task of about 200 training images (built-in class groups,
`--task`, written as an ImageFolder zip) with no config, and follows the job. The table gives the
wall time from the POST to `succeeded` (and from the job's start), its phases, and the test
accuracy the job measured. Target: done within 60 s at >= 80 % test accuracy.

    python benchmarks/rest_task.py [--task mnist:0-2] [--train-per-class 67] [--out out/rest_task]

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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from gnsp_core.data import load_task
    from gnsp_core.models import DEFAULT_MODEL
    from service.cli.build_default import build_default_with_bar
    from service.cli.demo_rest import submit_task, task_zip
    from service.cli.demo_service import check, local_service, wait_ready
    from service.settings import ServiceSettings

    if args.model is None:
        build_default_with_bar()
    task = load_task(args.task, max_train_per_class=args.train_per_class, max_test_per_class=args.test_per_class)
    with tempfile.TemporaryDirectory(prefix="gnsp-rest-task-") as tmp:
        work = Path(tmp)
        archive = task_zip(task, work)
        settings = ServiceSettings(store=str(work / "store"), model=args.model, work_dir=str(work / "scratch"))
        with local_service(settings) as url, httpx.Client(base_url=url, timeout=600) as client:
            wait_ready(client)
            model = check(client.get("/v1/models/1"))
            started = time.perf_counter()
            task_id = submit_task(client, task.name, archive, settings.default_method, {})
            seen: dict[str, float] = {}
            while True:
                record = check(client.get(f"/v1/tasks/{task_id}"))
                phase = record.get("phase") or record["status"]
                seen.setdefault(phase, round(time.perf_counter() - started, 1))
                if record["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.25)
            wall = time.perf_counter() - started
    metrics = record.get("metrics") or {}
    accuracy = metrics.get("task_accuracy")
    return {"model": args.model or DEFAULT_MODEL, "task": task.name, "classes": len(task.classnames),
            "train_images": len(task.train.labels), "test_images": len(task.test.labels),
            "method": settings.default_method, "training": model["recommended_training"],
            "status": record["status"], "wall_s": round(wall, 1),
            "phases_first_seen_s": seen, "task_accuracy": accuracy, "metrics": metrics,
            "target_met": record["status"] == "succeeded" and wall <= TARGET_S
            and accuracy is not None and accuracy >= TARGET_ACCURACY}


def table(result: dict[str, Any]) -> str:
    accuracy = result["task_accuracy"]
    phases = ", ".join(f"{name} at {s} s" for name, s in result["phases_first_seen_s"].items())
    return "\n".join([
        "| model | task | train / test images | method | status | wall s (POST to done) | test accuracy % | target |",
        "|---|---|---|---|---|---:|---:|---|",
        f"| {result['model']} | {result['task']} ({result['classes']} classes) | {result['train_images']} / "
        f"{result['test_images']} | {result['method']} | {result['status']} | {result['wall_s']} | "
        f"{'-' if accuracy is None else f'{accuracy:.1f}'} | {'met' if result['target_met'] else 'missed'} "
        f"(<= {TARGET_S:g} s, >= {TARGET_ACCURACY:g} %) |",
        "", f"phases: {phases}", f"training settings: {json.dumps(result['training'])}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="open_clip name or 'tiny'; left out: gnsp-mini")
    parser.add_argument("--task", default="mnist:0-2", help="a task source (default: digits 0, 1, 2)")
    parser.add_argument("--train-per-class", type=int, default=67, help="training images per class (about 200 in all)")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("out/rest_task"))
    args = parser.parse_args()
    result = run(args)
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rest_task.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out / 'rest_task.json'}")


if __name__ == "__main__":
    main()
