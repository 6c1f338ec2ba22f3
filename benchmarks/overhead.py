"""What GNSP's projection costs: step time against the same step without it, and per-task update time.

For each model: a first task gives projector statistics, then the second task's steps are timed for
  - finetune:           task loss only, every parameter trains;
  - gnsp, no projection: GNSP's losses and trainable set, projection switched off (the fair baseline);
  - gnsp (paper):        gradient projection on the vision MLPs and visual.proj;
  - gnsp exact:          update projection on every linear map of both towers.
The projection itself (gradient or snapshot + update projection) is also timed call by call, so its
cost per step is measured directly rather than as the difference of two noisy step medians:
`(finetune + projection) / finetune` is what the projection adds to a fine-tune step. The full GNSP
step is dearer than a fine-tune step mainly because CD and MAP forward 64 reference pairs per step.
The null-space update (statistics pass over the task + eigendecomposition) is timed per task.
The reference pairs' frozen outputs are primed before GNSP's timed task, as on a service node
(gnsp_core.trainer.prime_frozen_outputs): each step then runs the reference pairs through the
heads only, as every job on a primed node does; the task's own images are new to both methods.
Prints a markdown table and writes JSON:  python benchmarks/overhead.py --models gnsp-mini,tiny --out out/overhead
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gnsp_core.config import TrainConfig, preset
from gnsp_core.data import ImageSamples, Task
from gnsp_core.linear_maps import LinearMapSet
from gnsp_core.models import ModelSpec, load_model
from gnsp_core.projection import NullSpaceProjector
from gnsp_core.data.reference import CaptionPairs
from gnsp_core.state import ContinualState
from gnsp_core.trainer import learn_task, prime_frozen_outputs


def synthetic_task(name: str, n: int, size: int, seed: int) -> Task:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    labels = [i % 4 for i in range(n)]
    samples = ImageSamples(images, labels)
    return Task(name, ["cat", "dog", "car", "tree"], samples, samples)


def synthetic_reference(n: int, size: int) -> CaptionPairs:
    rng = np.random.default_rng(99)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    return CaptionPairs(images, [f"a photo of thing number {i % 16}" for i in range(n)])


def timed_steps(loaded, state, task, config, reference, frozen_outputs) -> tuple[float, float]:
    """(median ms per step after the first, seconds of the rest of learn_task: statistics + update)."""
    stamps: list[float] = []
    learn_task(state, loaded, task, config, reference=reference, progress=lambda p: stamps.append(time.perf_counter()),
               frozen_outputs=frozen_outputs)
    end = time.perf_counter()
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    return 1000 * statistics.median(steps), end - stamps[-1]


class ProjectionTimer:
    """Wall time spent inside the projector's per-step methods while installed."""

    METHODS = ("project_gradients", "snapshot", "project_updates")

    def __init__(self, disable: bool = False) -> None:
        self.disable, self.seconds, self.steps, self._saved = disable, 0.0, 0, {}

    def __enter__(self) -> "ProjectionTimer":
        for name in self.METHODS:
            original = self._saved[name] = getattr(NullSpaceProjector, name)
            setattr(NullSpaceProjector, name, self._timed(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(NullSpaceProjector, name, original)

    def _timed(self, name: str, original):
        def wrapper(projector) -> None:
            if self.disable:
                return
            start = time.perf_counter()
            original(projector)
            self.seconds += time.perf_counter() - start
            self.steps += name != "snapshot"
        return wrapper

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / self.steps if self.steps else 0.0


def eig_seconds(loaded, state, config: TrainConfig) -> float:
    maps = LinearMapSet(loaded.model, config.projection.scope)
    start = time.perf_counter()
    NullSpaceProjector(maps, state.stats, config.projection)
    return time.perf_counter() - start


def bench_model(name: str, steps: int, batch: int, ref_batch: int, frozen_outputs: Path) -> list[dict]:
    loaded = load_model(ModelSpec(name=name))
    size = loaded.image_size
    task1, task2 = synthetic_task("t1", 2 * batch, size, 1), synthetic_task("t2", 4 * batch, size, 2)
    reference = synthetic_reference(2 * ref_batch, size)
    common = dict(steps=steps, batch_size=batch, ref_batch_size=ref_batch, warmup_steps=1, stats_batch_size=batch)
    variants = {
        "finetune": TrainConfig(method="finetune", **common),
        "gnsp, no projection": preset("gnsp", **common),
        "gnsp (paper)": preset("gnsp", **common),
        "gnsp exact": preset("gnsp-exact", **common),
    }
    initial = ContinualState.initial(loaded.model, loaded.spec)
    rows = []
    for label, config in variants.items():
        loaded.model.load_state_dict(initial.weights)
        first = learn_task(initial, loaded, task1, config.replace(steps=1), reference=reference)
        if config.method == "gnsp":  # as a service node is primed before its first job
            prime_frozen_outputs(loaded, config, reference, frozen_outputs)
        with ProjectionTimer(disable=label == "gnsp, no projection") as timer:
            step_ms, update_s = timed_steps(loaded, first, task2, config, reference, frozen_outputs)
        eig_s = eig_seconds(loaded, first, config) if config.method == "gnsp" else 0.0
        rows.append({"model": name, "variant": label, "step_ms": step_ms,
                     "projection_ms": timer.ms_per_step,
                     "stats_pass_s": update_s if config.method == "gnsp" else 0.0, "eig_s": eig_s,
                     "task_images": len(task2.train)})
        print(f"  {name:10s} {label:22s} {step_ms:9.1f} ms/step", file=sys.stderr)
    base = next(r["step_ms"] for r in rows if r["variant"] == "gnsp, no projection")
    ft = next(r["step_ms"] for r in rows if r["variant"] == "finetune")
    for r in rows:
        r["vs_no_projection"] = r["step_ms"] / base
        r["vs_finetune"] = r["step_ms"] / ft
        r["finetune_plus_projection_vs_finetune"] = (ft + r["projection_ms"]) / ft
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | step ms | projection ms/step | × gnsp no-proj | × finetune | "
             "(finetune + projection) / finetune | stats pass s | eig s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['step_ms']:.1f} | {r['projection_ms']:.2f} | "
                     f"{r['vs_no_projection']:.3f} | {r['vs_finetune']:.2f} | "
                     f"{r['finetune_plus_projection_vs_finetune']:.3f} | {r['stats_pass_s']:.2f} | {r['eig_s']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gnsp-mini,tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ref-batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("out/overhead"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="gnsp-overhead-") as frozen_outputs:
        rows = [r for m in args.models.split(",")
                for r in bench_model(m, args.steps, args.batch_size, args.ref_batch_size, Path(frozen_outputs))]
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"\nwrote {args.out / 'overhead.json'}")


if __name__ == "__main__":
    main()
