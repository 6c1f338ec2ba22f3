"""One job's training on a worker group against the same training in the caller's process.

A service job trains through `service.training.ray_train.train_task`: with `workers=1` on a Ray
Train worker group (a controller and a worker process started for the run, each importing torch
and open_clip and the worker loading the model), with `workers=0` in the calling process (Ray
Train's local mode, service/training/local_run.py), as the service's attempt host does. Each round
runs both, in turn, on the same small task (the demo's size: a built-in class group, `--per-class`
training images per class, the model's recommended settings, as the demo), into a
run storage of its own, on one private local Ray: the ratio is measured in one run. The first
round also pays for this process's first imports and model load (the attempt host pays them once).

    python benchmarks/in_process.py [--task fashion:0-1] [--method finetune] [--rounds 3] [--out out/in_process]

Prints a table and writes in_process.json to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = {"worker group": 1, "in process": 0}


def write_task(source: str, per_class: int, folder: Path) -> Path:
    from gnsp_core.data import load_task
    from gnsp_core.data.folders import write_image_folder

    task = load_task(source, max_train_per_class=per_class, max_test_per_class=per_class // 2)
    return write_image_folder(folder, task.classnames, {"train": task.train, "test": task.test}, task.templates)


def one_run(job: Any, workers: int, storage: Path, name: str) -> dict[str, Any]:
    from service.training.ray_train import WorkerResources, free_cpus_per_worker, train_task

    resources = WorkerResources(workers=workers, cpus_per_worker=free_cpus_per_worker(workers))
    started = time.perf_counter()
    result = train_task(job, storage_path=str(storage), name=name, resources=resources)
    return {"wall_s": round(time.perf_counter() - started, 2), "train_s": round(result.metrics["train_s"], 2),
            "step": result.metrics["step"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from gnsp_core.config import TrainConfig
    from gnsp_core.models import ModelSpec, recommended_training
    from service.training.ray_train import TrainJob

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as gnsp serve and gnsp demo run
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # local mode logs every report at INFO
    config = TrainConfig.from_dict({**recommended_training(args.model), "method": args.method})
    rows: list[dict[str, Any]] = []
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="gnsp-in-process-") as tmp:
            folder = write_task(args.task, args.per_class, Path(tmp) / "task")
            reference = "builtin" if args.method != "finetune" else None
            job = TrainJob(task=str(folder), config=config, model=ModelSpec(name=args.model), reference=reference,
                           checkpoint_every=10)
            for round_ in range(1, args.rounds + 1):
                for mode, workers in MODES.items():
                    row = one_run(job, workers, Path(tmp) / "runs", f"{workers}-{round_}")
                    rows.append({"round": round_, "mode": mode, **row})
                    print(f"round {round_}, {mode}: {row['wall_s']} s", flush=True)
    finally:
        ray.shutdown()
    later = {mode: [r["wall_s"] for r in rows if r["mode"] == mode and r["round"] > 1] for mode in MODES}
    medians = {mode: round(statistics.median(walls), 2) for mode, walls in later.items() if walls}
    ratio = round(medians["worker group"] / medians["in process"], 2) if len(medians) == 2 else None
    return {"model": args.model, "task": args.task, "method": args.method, "per_class": args.per_class,
            "training": config.to_dict(), "rows": rows, "median_after_first_round_s": medians, "ratio": ratio}


def table(result: dict[str, Any]) -> str:
    lines = ["| round | mode | wall s (train_task) | of it training s | steps |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['round']} | {r['mode']} | {r['wall_s']} | {r['train_s']} | {r['step']} |" for r in result["rows"]]
    if result["ratio"] is not None:
        medians = result["median_after_first_round_s"]
        lines.append(f"\nmedian after the first round: worker group {medians['worker group']} s, in process "
                     f"{medians['in process']} s: the worker group takes {result['ratio']:.2f}x as long")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gnsp-mini")
    parser.add_argument("--task", default="fashion:0-1")
    parser.add_argument("--method", default="finetune")
    parser.add_argument("--per-class", type=int, default=40, help="training images per class (the demo's 40)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("out/in_process"))
    args = parser.parse_args()
    result = run(args)
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "in_process.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out / 'in_process.json'}")


if __name__ == "__main__":
    main()
