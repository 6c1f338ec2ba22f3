"""How training throughput scales with Ray Train workers (DDP, per-worker batch fixed).

For each worker count, one TorchTrainer learns the same task; throughput is measured from rank 0's
progress snapshots after `--warmup` steps (so process start, model load and DDP's first step are
left out): samples/s = steps x batch per worker x workers / seconds. Prints a markdown table and
writes JSON.

    python benchmarks/scaling.py --model tiny --workers 1,2 --out out/scaling             # CPU (gloo)
    python benchmarks/scaling.py --model ViT-B-16 --gpus-per-worker 1 --cpus-per-worker 4 \\
        --loader-workers 3 --workers 1,2,4 --batch-size 64 --out out/scaling-gpu       # GPU (nccl)

Throughput does not depend on the weights, so the GPU run needs no `--pretrained` (and no network).
On CPU every worker gets `--cpus-per-worker` cores (Ray sets its torch threads to match), so
1 worker x 1 core against 2 workers x 1 core is the comparison that matters on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from gnsp_core.config import TrainConfig
from gnsp_core.models import DEFAULT_MODEL, ModelSpec
from service.training.progress import JobProgress, open_board, watch_board
from service.training.cluster import ray_cluster
from service.training.ray_train import TrainJob, WorkerResources, train_task


def steady_rate(snapshots: list[JobProgress], warmup: int, samples_per_step: int) -> tuple[float, float]:
    """(samples/s, ms per step) between the first snapshot past `warmup` steps and the last one."""
    train = [s for s in snapshots if s.phase == "train" and s.step >= warmup]
    if len(train) < 2 or train[-1].step == train[0].step:
        raise RuntimeError("too few progress snapshots after warm-up: raise --steps")
    steps, seconds = train[-1].step - train[0].step, train[-1].updated - train[0].updated
    return steps * samples_per_step / seconds, 1000 * seconds / steps


def measure(args: argparse.Namespace, workers: int, storage: str) -> dict:
    """One TorchTrainer run with `workers` workers; returns its row of the table."""
    config = TrainConfig(method=args.method, steps=args.steps, batch_size=args.batch_size, lr=1e-5,
                         warmup_steps=1, stats_augment=False, num_workers=args.loader_workers)
    job = TrainJob(task=args.task, config=config, model=ModelSpec(args.model, args.pretrained),
                   reference=args.reference, checkpoint_every=args.steps)
    board = open_board(f"scaling-{workers}-{time.time_ns()}")
    snapshots: list[JobProgress] = []
    started = time.perf_counter()
    with watch_board(board, snapshots.append, interval_s=0.1):
        train_task(job, storage_path=storage, name=f"scaling-{workers}-{time.time_ns()}", board=board,
                   resources=WorkerResources(workers, args.gpus_per_worker, args.cpus_per_worker), max_failures=0)
    rate, step_ms = steady_rate(snapshots, args.warmup, args.batch_size * workers)
    return {"model": args.model, "workers": workers, "gpus_per_worker": args.gpus_per_worker,
            "cpus_per_worker": args.cpus_per_worker, "batch_per_worker": args.batch_size,
            "samples_per_s": rate, "step_ms": step_ms, "wall_s": time.perf_counter() - started}


def table(rows: list[dict]) -> str:
    base = rows[0]["samples_per_s"]
    lines = ["| model | workers | GPUs/worker | CPUs/worker | batch/worker | samples/s | ms/step | speed-up | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['workers']} | {r['gpus_per_worker']:g} | {r['cpus_per_worker']:g} | "
                     f"{r['batch_per_worker']} | {r['samples_per_s']:.1f} | {r['step_ms']:.0f} | "
                     f"{r['samples_per_s'] / base:.2f}x | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help=f"open_clip architecture, tiny, or {DEFAULT_MODEL}")
    p.add_argument("--pretrained", help="open_clip tag or local weights file")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--task", default="digits", help="task source (built-in name, folder or archive)")
    p.add_argument("--method", default="finetune")
    p.add_argument("--reference", help="reference spec for gnsp/zscl, e.g. builtin")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the measurement")
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker (GPU runs)")
    p.add_argument("--address", help="Ray cluster to join (default: a private local one)")
    p.add_argument("--out", required=True, help="folder for scaling.json and scaling.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    counts = [int(w) for w in args.workers.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ray_cluster(args.address, num_cpus=int(max(counts) * args.cpus_per_worker)), \
            tempfile.TemporaryDirectory(prefix="gnsp-scaling-") as storage:
        rows = [measure(args, n, storage) for n in counts]
    text = table(rows)
    print(text)
    (out / "scaling.md").write_text(text + "\n")
    (out / "scaling.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
