"""One command for a GPU machine: step times, DDP statistics equality and the classifier under load.

    python benchmarks/gpu_check.py --out out/gpu_check            # needs a CUDA GPU
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/check   # the same checks, tiny model on CPU

1. Step times of ViT-B/16 (random weights, 224 px, batch 64, 64 reference pairs: the paper's
   sizes) for fine-tune and GNSP (paper projection, second task) in fp32 and with bf16 autocast:
   median ms per step, peak GPU memory, and GNSP's statistics pass + eigendecomposition time.
2. Two DDP workers (torch.distributed: NCCL with two GPUs, gloo otherwise, both on the GPU when
   there is one) learn two GNSP tasks, each on its half of the data with `stat_norm=task`; their
   projector statistics and weights must be equal, and the statistics equal to one process's over
   all the data (up to summation order).
3. The classifier under load: `benchmarks/serve_load.py --gpus 1` (its JSON is embedded).
Writes gpu_check.json to --out; exits 1 when a check fails, 2 when there is no GPU (without
--cpu-smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gnsp_core.config import TrainConfig, preset
from gnsp_core.data import ImageSamples, Task
from gnsp_core.data.reference import CaptionPairs
from gnsp_core.models import ModelSpec, load_model
from gnsp_core.state import ContinualState
from gnsp_core.task_context import Distributed
from gnsp_core.trainer import learn_task

REPO = Path(__file__).resolve().parent.parent


def synthetic_task(name: str, n: int, size: int, seed: int) -> Task:
    rng = np.random.default_rng(seed)
    samples = ImageSamples([rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)],
                           [i % 4 for i in range(n)])
    return Task(name, ["cat", "dog", "car", "tree"], samples, samples)


def synthetic_reference(n: int, size: int) -> CaptionPairs:
    from PIL import Image

    rng = np.random.default_rng(99)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    return CaptionPairs(images, [f"a photo of thing number {i % 16}" for i in range(n)])


def settings(smoke: bool) -> dict[str, Any]:
    if smoke:
        return dict(model="tiny", batch=8, ref=8, steps=4, device="cpu", ddp_images=16)
    return dict(model="ViT-B-16", batch=64, ref=64, steps=30, device="cuda", ddp_images=128)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_times(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Median step time of a second task for fine-tune and GNSP, fp32 and bf16 autocast."""
    loaded = load_model(ModelSpec(name=s["model"]))
    size = loaded.image_size
    task1, task2 = synthetic_task("t1", 2 * s["batch"], size, 1), synthetic_task("t2", 4 * s["batch"], size, 2)
    reference = synthetic_reference(2 * s["ref"], size)
    common = dict(steps=s["steps"], batch_size=s["batch"], ref_batch_size=s["ref"], warmup_steps=1,
                  stats_batch_size=16, device=s["device"])
    initial = ContinualState.initial(loaded.model, loaded.spec)
    rows = []
    for method in ("finetune", "gnsp"):
        for amp in (False, True):
            config = (TrainConfig(method="finetune") if method == "finetune" else preset("gnsp")).replace(**common, amp=amp)
            first = learn_task(initial, loaded, task1, config.replace(steps=1), reference=reference)
            if s["device"] == "cuda":
                torch.cuda.reset_peak_memory_stats()
            stamps: list[float] = []
            _sync(s["device"])

            def stamp(progress) -> None:
                if progress.phase == "train":
                    _sync(s["device"])
                    stamps.append(time.perf_counter())

            learn_task(first, loaded, task2, config, reference=reference, progress=stamp)
            _sync(s["device"])
            end = time.perf_counter()
            steps = [b - a for a, b in zip(stamps[:-1], stamps[1:])][min(5, len(stamps) // 2):]
            rows.append({"method": method, "precision": "bf16 autocast" if amp else "fp32",
                         "amp_active": amp and s["device"] == "cuda",
                         "median_step_ms": 1000 * statistics.median(steps), "steps_timed": len(steps),
                         "after_training_s": end - stamps[-1],
                         "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if s["device"] == "cuda" else None})
            print(f"  {method} {rows[-1]['precision']}: {rows[-1]['median_step_ms']:.1f} ms/step", file=sys.stderr)
    return rows


def _ddp_worker(rank: int, world: int, s: dict[str, Any], init_file: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    gpus = torch.cuda.device_count() if s["device"] == "cuda" else 0
    backend = "nccl" if gpus >= world else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        device = f"cuda:{rank % gpus}" if gpus else "cpu"
        if gpus:
            torch.cuda.set_device(device)

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t

        def wrap(model: torch.nn.Module) -> torch.nn.Module:
            return DistributedDataParallel(model, device_ids=[device] if gpus else None)

        distributed = Distributed(rank, world, all_reduce, wrap)
        loaded, state = run_two_tasks(s, device, distributed)
        shard = statistics_pass(loaded, s, device, range(rank, s["ddp_images"], world), all_reduce)
        torch.save({"stats": state.stats.covariances, "weights": state.weights, "pass": shard, "backend": backend},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def run_two_tasks(s: dict[str, Any], device: str, distributed: Distributed) -> tuple[Any, ContinualState]:
    """Two GNSP tasks (the second projected: its eigendecomposition is rank 0's, broadcast)."""
    loaded = load_model(ModelSpec(name=s["model"]))
    size = loaded.image_size
    config = preset("gnsp").replace(steps=2, batch_size=s["batch"], ref_batch_size=s["ref"], warmup_steps=1,
                                    stats_batch_size=8, stats_augment=False, device=device, amp=False,
                                    cache_views=0, projection_stat_norm="task")
    state = ContinualState.initial(loaded.model, loaded.spec)
    for t in (1, 2):
        state = learn_task(state, loaded, synthetic_task(f"t{t}", s["ddp_images"], size, t), config,
                           reference=synthetic_reference(2 * s["ref"], size), distributed=distributed)
    return loaded, state


def statistics_pass(loaded, s: dict[str, Any], device: str, indices: range, all_reduce=None) -> dict[str, torch.Tensor]:
    """One statistics pass (stat_norm=task) over the given images of the third task, with the model's weights."""
    from gnsp_core.linear_maps import LinearMapSet
    from gnsp_core.projection import collect_statistics

    model = loaded.model.to(device).eval()
    task = synthetic_task("t3", s["ddp_images"], loaded.image_size, 3).train.with_transform(loaded.preprocess_val)
    images = [task[i][0] for i in indices]
    batches = [torch.stack(images[i:i + 8]).to(device) for i in range(0, len(images), 8)]
    stats = collect_statistics(LinearMapSet(model, "vision_mlp"), batches, model.encode_image, "task", all_reduce)
    return {k: v.cpu() for k, v in stats.items()}


def ddp_check(s: dict[str, Any]) -> dict[str, Any]:
    """Both ranks end with equal statistics and weights; an all-reduced pass equals one process's."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        mp.spawn(_ddp_worker, args=(2, s, f"{tmp}/init", f"{tmp}/out"), nprocs=2, join=True)
        elapsed = time.perf_counter() - started
        zero, one = (torch.load(f"{tmp}/out.{r}", weights_only=False) for r in (0, 1))
    loaded = load_model(ModelSpec(name=s["model"]))
    loaded.model.load_state_dict(zero["weights"])
    single = statistics_pass(loaded, s, s["device"], range(s["ddp_images"]))
    diff = lambda a, b, keys: max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)  # noqa: E731
    floats = [k for k in zero["weights"] if zero["weights"][k].is_floating_point()]
    result = {"backend": zero["backend"], "workers": 2, "seconds": elapsed, "maps": len(zero["stats"]),
              "stats_max_abs_diff_between_ranks": diff(zero["stats"], one["stats"], zero["stats"]),
              "weights_max_abs_diff_between_ranks": diff(zero["weights"], one["weights"], floats),
              "pass_max_abs_diff_between_ranks": diff(zero["pass"], one["pass"], zero["pass"]),
              "pass_max_abs_diff_vs_one_process": diff(zero["pass"], single, single)}
    result["equal"] = (result["stats_max_abs_diff_between_ranks"] == 0.0
                       and result["weights_max_abs_diff_between_ranks"] == 0.0
                       and result["pass_max_abs_diff_between_ranks"] == 0.0
                       and result["pass_max_abs_diff_vs_one_process"] < 1e-5)
    return result


def serve_check(smoke: bool, model: str | None, seconds: float, out: Path) -> dict[str, Any]:
    """`benchmarks/serve_load.py --gpus 1` in a subprocess; its JSON, or why it failed."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--seconds", str(seconds),
           "--out", str(out), "--gpus", "0" if smoke else "1"]
    if smoke:
        cmd += ["--warmup", "1"]
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "serve_load.json").is_file():
        return {"command": " ".join(cmd), "ok": False, "returncode": proc.returncode, "stderr_tail": proc.stderr[-3000:]}
    return {"command": " ".join(cmd), "ok": True, "result": json.loads((out / "serve_load.json").read_text())}


def environment(smoke: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cpu_smoke": smoke,
                            "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                    bf16_supported=torch.cuda.is_bf16_supported())
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU needed: the same checks with the tiny model on the CPU, a few steps each")
    parser.add_argument("--skip-serve", action="store_true", help="leave out the classifier load test")
    parser.add_argument("--serve-model", default=None, help="serve_load.py --model (default: its own; tiny in smoke)")
    parser.add_argument("--serve-seconds", type=float, default=None, help="serve_load.py --seconds (10; smoke 2)")
    parser.add_argument("--out", type=Path, default=Path("out/gpu_check"))
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch on this machine (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or use --cpu-smoke to test the script with the tiny model on the CPU",
              file=sys.stderr)
        return 2
    s = settings(args.cpu_smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"environment": environment(args.cpu_smoke), "settings": s}
    result["step_times"] = step_times(s)
    result["ddp_statistics"] = ddp_check(s)
    if not args.skip_serve:
        seconds = args.serve_seconds or (2.0 if args.cpu_smoke else 10.0)
        model = args.serve_model or ("tiny" if args.cpu_smoke else None)
        result["serve_load"] = serve_check(args.cpu_smoke, model, seconds, args.out / "serve_load")
    result["ok"] = result["ddp_statistics"]["equal"] and result.get("serve_load", {"ok": True})["ok"]
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("step_times", "ddp_statistics", "ok")}, indent=2))
    print(f"wrote {args.out / 'gpu_check.json'}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
