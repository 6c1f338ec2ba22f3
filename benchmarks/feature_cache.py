"""What the feature cache buys on the default model: the same tasks learned with it and without it.

gnsp-mini trains only its heads (`trainable=auto`), so its two pre-trained trunks are frozen and
their outputs can be computed once per image and view (`TrainConfig.cache_views`) instead of at
every step. For each method, two built-in tasks are learned in one process, once with the cache
(`--views`, default the config's) and once without it (`cache_views=0`); the table gives each
task's wall time, the median step time and the test accuracy after it, and the ratios the cache
and GNSP's extra losses make. One job at a time, both settings in the same run:

    python benchmarks/feature_cache.py --out out/feature_cache
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from gnsp_core.config import TrainConfig
from gnsp_core.data import load_task
from gnsp_core.data.reference import load_reference_pairs
from gnsp_core.evaluation import task_accuracy
from gnsp_core.models import DEFAULT_MODEL, ModelSpec, load_model
from gnsp_core.state import ContinualState
from gnsp_core.trainer import learn_task


def run(method: str, views: int, args: argparse.Namespace, pool) -> list[dict]:
    """One run: its own copy of the reference pool, so no run reuses what another one cached
    (the pre-trained model's features and the memo both live as long as the pool object)."""
    reference = pool.subset(list(range(len(pool))))
    loaded = load_model(ModelSpec(name=args.model))
    state = ContinualState.initial(loaded.model, loaded.spec)
    config = TrainConfig(method=method, steps=args.steps, lr=args.lr, cache_views=views)
    rows = []
    for source in args.tasks.split(","):
        task = load_task(source, max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class)
        stamps: list[float] = []
        start = time.perf_counter()
        state = learn_task(state, loaded, task, config, reference=reference,
                           progress=lambda p: stamps.append(time.perf_counter()))
        wall = time.perf_counter() - start
        loaded.model.load_state_dict(state.weights)
        steps = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
        rows.append({"method": method, "cache_views": views, "task": task.name, "train_images": len(task.train),
                     "wall_s": wall, "step_ms": 1000 * statistics.median(steps),
                     "accuracy": task_accuracy(loaded, task, state.extras)})
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["method"], r["cache_views"], r["task"]): r for r in rows}
    lines = ["| method | task | images | cache: wall s | step ms | acc % | no cache: wall s | step ms | acc % | "
             "speed-up (wall) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (method, views, task), r in by.items():
        if views == 0:
            continue
        plain = by[(method, 0, task)]
        lines.append(f"| {method} | {task} | {r['train_images']} | {r['wall_s']:.1f} | {r['step_ms']:.0f} | "
                     f"{r['accuracy']:.1f} | {plain['wall_s']:.1f} | {plain['step_ms']:.0f} | {plain['accuracy']:.1f} | "
                     f"{plain['wall_s'] / r['wall_s']:.2f}x |")
    return "\n".join(lines)


def ratios(rows: list[dict], views: int) -> str:
    """GNSP's step against fine-tune's, with and without the cache (median over the tasks after the first)."""
    out = []
    for v in (views, 0):
        step = {m: statistics.median(r["step_ms"] for r in rows if r["method"] == m and r["cache_views"] == v)
                for m in ("gnsp", "finetune")}
        out.append(f"cache_views={v}: gnsp step / finetune step = {step['gnsp'] / step['finetune']:.2f}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tasks", default="digits,textiles")
    parser.add_argument("--methods", default="finetune,gnsp")
    parser.add_argument("--views", type=int, default=TrainConfig().cache_views)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-train-per-class", type=int, default=64)
    parser.add_argument("--max-test-per-class", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("out/feature_cache"))
    args = parser.parse_args()
    reference = load_reference_pairs()
    rows = []
    for method in args.methods.split(","):
        for views in (args.views, 0):
            rows += run(method, views, args, reference)
            print(f"done: {method}, cache_views={views}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows}, indent=2))
    text = table(rows) + "\n\n" + (ratios(rows, args.views) if {"gnsp", "finetune"} <= set(args.methods.split(",")) else "")
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
