"""One REST task job with its Ray Train workers on one node against the same job spread over two nodes.

    python benchmarks/multinode.py [--steps 60] [--workers 2] [--out out/multinode.json]

For each layout a fresh cluster on this machine (tests/ray_nodes.py): a head running `gnsp serve`
with the store on SeaweedFS (tests/seaweedfs.py), plus trainer nodes that share no disk with it
(each in its own mount namespace, a private /tmp). "1 node": one trainer node holds all workers;
"2 nodes": one worker on each of two trainer nodes (gloo DDP between them). The job is timed from
the POST to `succeeded` (wall), and Ray Train's own samples/s and training seconds are read from
the job's metrics. Prints a table and writes the JSON. On one machine both layouts share its
cores, so this measures the cost of crossing nodes (fetching from the store, DDP between nodes),
not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ray_nodes import LocalCluster, free_port  # noqa: E402
from seaweedfs import start_seaweedfs  # noqa: E402
from service_support import colour_zip, wait_for, write_colour_folder  # noqa: E402

TRAINER = "trainer"


def service_settings(scratch: Path, heldout: Path) -> dict[str, Any]:
    return {"work_dir": str(scratch), "heldout": str(heldout), "max_heldout_drop": 100.0,
            "default_method": "finetune", "checkpoint_every": 1000, "cpus_per_worker": 1,
            "worker_resources": {TRAINER: 1}}


def run_layout(nodes: int, args: argparse.Namespace, s3, tmp: Path) -> dict[str, Any]:
    """Start a cluster with `nodes` trainer nodes, run one job through the API, return its numbers."""
    scratch = Path("/tmp") / f"gnsp-bench-scratch-{nodes}"
    heldout = write_colour_folder(tmp / f"heldout-{nodes}", ["red", "green", "blue"], n_train=2, n_test=2, seed=7)
    port = free_port()
    env = {**s3.env(), "PYTHONPATH": str(ROOT), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    try:
        with LocalCluster(head_cpus=1, env=env) as cluster, \
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            cluster.serve(s3.uri(f"bench-{nodes}-{int(time.time())}"), port, service_settings(scratch, heldout),
                          "--workers", str(args.workers))
            cluster.wait_healthy(client)  # the service's replicas are on the head before any trainer node joins
            per_node = args.workers // nodes
            for i in range(nodes):
                cluster.add_node(f"trainer-{i}", num_cpus=per_node, resources={TRAINER: per_node})
            started = time.perf_counter()
            response = client.post("/v1/tasks", data={"name": "rgb", "config": json.dumps(
                {"steps": args.steps, "batch_size": args.batch_size, "warmup_steps": 1, "lr": 1e-3})},
                files={"dataset": ("rgb.zip", colour_zip(tmp, ["red", "green", "blue"], n_train=16), "application/zip")})
            response.raise_for_status()
            job = wait_for(client, response.json()["task_id"], timeout=1800)
            wall = time.perf_counter() - started
            if job["status"] != "succeeded":
                raise RuntimeError(f"{nodes} node(s): job {job['status']}: {job.get('error')}\n{cluster.log('serve')}")
            metrics = job["metrics"]
            return {"nodes": nodes, "workers": args.workers, "steps": args.steps, "wall_s": round(wall, 2),
                    "train_s": round(metrics.get("train_s", 0.0), 2),
                    "samples_per_s": round(metrics.get("samples_per_s") or 0.0, 1)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| trainer nodes | workers | steps | job wall (s) | training (s) | samples/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['nodes']} | {r['workers']} | {r['steps']} | {r['wall_s']} | {r['train_s']} | {r['samples_per_s']} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (a multiple of 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "multinode.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gnsp-bench-") as name:
        tmp = Path(name)
        with start_seaweedfs(tmp) as s3:
            rows = []
            for nodes in (1, 2):
                rows.append(run_layout(nodes, args, s3, tmp))
                print(json.dumps(rows[-1]), flush=True)  # each layout as soon as it is measured
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2))
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
