"""The fixed cost of one Ray Train run on this machine: what every service job pays before and after
its own work.

Each fit runs a loop that only imports open_clip (and gnsp_core's trainer) and loads the model, on a
private local Ray, one worker, as a service job's TorchTrainer does (Ray Train V2: a controller
actor and a worker actor, both new processes). The loop writes its timestamps to a file, so the
table splits each fit's wall time into: until the loop starts (the controller and the worker process
started, torch imported by Ray Train's Torch backend, the process group set up), the open_clip import,
the model load, and from the loop's end until `fit()` returns (the run wound down). The first fit
also pays for Ray's first worker processes; the later ones are what each job of a running service pays.

    python benchmarks/train_start.py [--model gnsp-mini] [--fits 3] [--out out/train_start]

Prints a table and writes train_start.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def _loop(config: dict[str, Any]) -> None:
    marks = {"loop": time.time()}
    import open_clip  # noqa: F401

    import gnsp_core.trainer  # noqa: F401
    marks["imports"] = time.time()
    from gnsp_core.models import ModelSpec, load_model

    load_model(ModelSpec(name=config["model"]))
    marks["model"] = time.time()
    Path(config["marks"]).write_text(json.dumps(marks))


def one_fit(model: str, storage: Path, index: int) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    marks_file = storage / f"marks-{index}.json"
    started = time.time()
    TorchTrainer(_loop, train_loop_config={"model": model, "marks": str(marks_file)},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"fit-{index}", storage_path=str(storage))).fit()
    ended = time.time()
    marks = json.loads(marks_file.read_text())
    return {"fit_s": ended - started, "until_loop_s": marks["loop"] - started,
            "imports_s": marks["imports"] - marks["loop"], "model_s": marks["model"] - marks["imports"],
            "after_loop_s": ended - marks["model"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gnsp-mini")
    parser.add_argument("--fits", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("out/train_start"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as gnsp serve and gnsp demo run
    import ray

    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="gnsp-train-start-") as storage:
            rows = [one_fit(args.model, Path(storage), i) for i in range(args.fits)]
    finally:
        ray.shutdown()
    columns = ("fit_s", "until_loop_s", "imports_s", "model_s", "after_loop_s")
    print(f"| fit | {' | '.join(columns)} |\n|---:|{'---:|' * len(columns)}")
    for i, row in enumerate(rows, 1):
        print(f"| {i} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_start.json").write_text(json.dumps({"model": args.model, "fits": rows}, indent=2))
    print(f"\nwrote {args.out / 'train_start.json'}")


if __name__ == "__main__":
    main()
