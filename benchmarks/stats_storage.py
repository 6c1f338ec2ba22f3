"""What GNSP's projector statistics cost on disk, and what the compact forms do to the null space.

1. Bytes per version for open_clip architectures at the paper's scope (`vision_mlp`: vision MLPs
   + `visual.proj`) and at `all` (every linear map of both towers), from the models' layer shapes
   (built on the meta device: no weights, no memory): float64 full matrices (the first state
   format), the float32 upper triangle (the default), and eigen-truncated storage at a kept
   fraction r of each map's eigenvectors (bytes 4·d·k + 8·k with k = ⌈r·d⌉; how many eigenvectors
   hold a given energy depends on the trained model's spectrum, so r is a parameter here and is
   measured on the tiny model below). A version stores new statistics only for the maps its task
   changed: after a GNSP task all of them, after any other method's task none (shared blobs).
2. The null-space difference on a trained tiny model: two GNSP tasks give float64 statistics;
   each storage form is written and read back; per map, ‖P₆₄ − P‖₂ (the sine of the largest
   principal angle between the two null spaces when their dimensions agree) and the null-space
   dimensions; then a third task trains from each and we measure the relative change of every
   protected map's output on the old tasks' inputs ‖ΔW X‖/‖W X‖, the old tasks' accuracy, and how
   far the trained weights lie from the float64 run's.

    python benchmarks/stats_storage.py --out out/stats_storage     # table on stdout + results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gnsp_core.config import preset
from gnsp_core.data import ImageSamples, Task
from gnsp_core.data.reference import CaptionPairs
from gnsp_core.evaluation import task_accuracy
from gnsp_core.linear_maps import LinearMapSet
from gnsp_core.models import ModelSpec, load_model
from gnsp_core.projection import ProjectorStatistics, collect_statistics, split_spectrum
from gnsp_core.state import ContinualState
from gnsp_core.stats_storage import STATS_DIR, read_statistics, write_statistics
from gnsp_core.trainer import learn_task

EIGEN_FRACTIONS = (0.25, 0.5)


# --- 1. bytes per version from layer shapes ------------------------------------------------------

def map_dims(architecture: str, scope: str) -> list[int]:
    """Input dimension of every protected map of an open_clip architecture (meta device, no weights)."""
    import open_clip

    with torch.device("meta"):
        model = open_clip.create_model(architecture, pretrained=None, device="meta")
    return [m.in_features for m in LinearMapSet(model, scope)]


def storage_bytes(dims: list[int]) -> dict[str, int]:
    sizes = {"float64_full": sum(8 * d * d for d in dims),
             "float32_triangle": sum(4 * d * (d + 1) // 2 for d in dims)}
    for r in EIGEN_FRACTIONS:
        sizes[f"eigen_r{r}"] = sum(4 * d * math.ceil(r * d) + 8 * math.ceil(r * d) for d in dims)
    return sizes


def storage_table(architectures: list[str]) -> list[dict[str, Any]]:
    rows = []
    for arch in architectures:
        for scope in ("vision_mlp", "all"):
            dims = map_dims(arch, scope)
            rows.append({"model": arch, "scope": scope, "maps": len(dims), **storage_bytes(dims)})
            print(f"  {arch} {scope}: {len(dims)} maps", file=sys.stderr)
    return rows


# --- 2. the null-space difference on a trained tiny model ----------------------------------------

def colour_task(name: str, colours: dict[str, tuple[int, int, int]], n: int, seed: int, size: int) -> Task:
    """Noisy single-colour images with random stripes: learnable in a few steps by the tiny model."""
    rng = np.random.default_rng(seed)

    def split(count: int) -> ImageSamples:
        images, labels = [], []
        for label, rgb in enumerate(colours.values()):
            for _ in range(count):
                img = rng.normal(0, 25, (size, size, 3)) + np.array(rgb)
                img[:, rng.integers(0, size, 4)] = rng.integers(0, 255)
                images.append(np.clip(img, 0, 255).astype(np.uint8))
                labels.append(label)
        return ImageSamples(images, labels)

    return Task(name, list(colours), split(n), split(n // 2))


def tiny_tasks(size: int) -> list[Task]:
    return [colour_task("warm", {"red": (220, 30, 30), "yellow": (230, 220, 30)}, 24, 1, size),
            colour_task("cool", {"blue": (30, 60, 220), "green": (30, 200, 40)}, 24, 2, size),
            colour_task("grey", {"black": (20, 20, 20), "white": (235, 235, 235)}, 24, 3, size)]


def reference_pairs(size: int) -> CaptionPairs:
    from PIL import Image

    rng = np.random.default_rng(99)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(32)]
    return CaptionPairs(images, [f"a photo of thing number {i % 8}" for i in range(32)])


def stored_as(stats: ProjectorStatistics, storage: str, energy: float, folder: Path) -> tuple[ProjectorStatistics, int]:
    """The statistics after a write and read in `storage` form, and the bytes written."""
    source = ProjectorStatistics(stats.covariances, stats.num_tasks, storage, energy)  # type: ignore[arg-type]
    files = write_statistics(source, folder)
    size = sum(p.stat().st_size for p in (folder / STATS_DIR).iterdir())
    return read_statistics(folder, files, stats.num_tasks, storage, energy), size


def null_projector(stats: ProjectorStatistics, name: str, rule: str, threshold: float) -> torch.Tensor:
    range_basis, _ = split_spectrum(stats.spectrum(name, "cpu"), rule, threshold)  # type: ignore[arg-type]
    return torch.eye(range_basis.shape[0], dtype=torch.float64) - range_basis @ range_basis.T


def old_inputs(loaded, state: ContinualState, tasks: list[Task], scope: str) -> dict[str, torch.Tensor]:
    """Σ XᵀX of every protected map's inputs on the old tasks' test images, with the weights of `state`."""
    loaded.model.load_state_dict(state.weights)
    loaded.model.eval()
    maps = LinearMapSet(loaded.model, scope)
    grams: dict[str, torch.Tensor] = {}
    for task in tasks:
        images = torch.stack([x for x, _ in task.test.with_transform(loaded.preprocess_val)])
        for k, g in collect_statistics(maps, [images], loaded.model.encode_image, stat_norm="task").items():
            grams[k] = grams.get(k, 0) + g
    return grams


def output_change(model, before: dict, after: dict, grams: dict[str, torch.Tensor], scope: str) -> dict[str, float]:
    """Per map ‖ΔW X‖_F / ‖W X‖_F from the inputs' Gram matrix G = XᵀX."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for m in LinearMapSet(model, scope):
        key = names[id(m.weight)]
        w0, dw, g = before[key].double(), after[key].double() - before[key].double(), grams[m.name]
        quad = (lambda a: torch.trace(a @ g @ a.T)) if m.side == "right" else (lambda a: torch.trace(a.T @ g @ a))
        out[m.name] = float(quad(dw).clamp_min(0).sqrt() / quad(w0).clamp_min(1e-30).sqrt())
    return out


VARIANTS = {  # label: (projection settings, storage forms measured)
    "paper: energy ρ=0.15, gradient": (dict(projection_rule="energy", projection_threshold=0.15),
                                       [("float64", 1.0), ("float32", 1.0), ("eigen", 0.9999), ("eigen", 0.999)]),
    "exact: cut-off a=10, update": (dict(projection_rule="cutoff", projection_threshold=10.0,
                                         projection_target="update"), [("float64", 1.0), ("float32", 1.0)]),
}


def null_space_effect(steps: int) -> list[dict[str, Any]]:
    loaded = load_model(ModelSpec(name="tiny", seed=0))
    tasks, reference = tiny_tasks(loaded.image_size), reference_pairs(loaded.image_size)
    base = preset("gnsp", steps=steps, batch_size=16, lr=1e-3, warmup_steps=2, ref_batch_size=16,
                  stats_batch_size=16, device="cpu", amp=False, cache_views=0, projection_storage="float64")
    state = ContinualState.initial(loaded.model, loaded.spec)
    for task in tasks[:2]:
        state = learn_task(state, loaded, task, base, reference=reference)
    grams = old_inputs(loaded, state, tasks[:2], base.projection.scope)
    rows = []
    for label, (settings, forms) in VARIANTS.items():
        config = base.replace(**settings)
        reference_weights, reference_p = None, {}
        for storage, energy in forms:
            with tempfile.TemporaryDirectory() as tmp:
                stats, size = stored_as(state.stats, storage, energy, Path(tmp))
            cfg = config.replace(projection_storage=storage, projection_storage_energy=energy)
            proj = cfg.projection
            p = {n: null_projector(stats, n, proj.rule, proj.threshold) for n in stats.covariances}
            reference_p = reference_p or p
            after = learn_task(dataclasses.replace(state, stats=stats), loaded, tasks[2], cfg, reference=reference)
            changes = output_change(loaded.model, state.weights, after.weights, grams, proj.scope)
            trained = torch.cat([after.weights[k].flatten() - state.weights[k].flatten() for k in sorted(after.weights)
                                 if k in state.weights and after.weights[k].is_floating_point()]).double()
            reference_weights = trained if reference_weights is None else reference_weights
            loaded.model.load_state_dict(after.weights)
            rows.append({
                "variant": label, "storage": storage, "energy_kept": energy, "stats_bytes": size,
                "eigenvectors_kept": (sum(stats.spectra[n].vectors.shape[1] for n in stats.spectra)
                                      / sum(stats.spectra[n].dim for n in stats.spectra)) if storage == "eigen" else 1.0,
                "null_dims": {n: int(torch.trace(p[n]).round()) for n in p},
                "projector_diff_2norm_max": max(float(torch.linalg.matrix_norm(p[n] - reference_p[n], 2)) for n in p),
                "old_output_change_max": max(changes.values()),
                "old_output_change_mean": sum(changes.values()) / len(changes),
                "weights_vs_float64_run": float((trained - reference_weights).norm() / reference_weights.norm()),
                "old_task_accuracy": [task_accuracy(loaded, t) for t in tasks[:2]],
            })
            print(f"  {label} {storage} {energy}: {rows[-1]['old_output_change_max']:.3g}", file=sys.stderr)
    return rows


# --- report ----------------------------------------------------------------------------------------

def markdown(storage: list[dict], effect: list[dict]) -> str:
    gb = lambda b: f"{b / 1e9:.3f}"  # noqa: E731
    lines = ["| model | scope | maps | float64 full GB (before) | float32 triangle GB (default) | "
             + " | ".join(f"eigen r={r} GB" for r in EIGEN_FRACTIONS) + " |",
             "|---|---|---|---|---|" + "---|" * len(EIGEN_FRACTIONS)]
    for r in storage:
        eig = " | ".join(gb(r[f"eigen_r{f}"]) for f in EIGEN_FRACTIONS)
        lines.append(f"| {r['model']} | {r['scope']} | {r['maps']} | {gb(r['float64_full'])} | "
                     f"{gb(r['float32_triangle'])} | {eig} |")
    lines += ["", "| variant | storage | energy kept | eigenvectors kept | stats bytes | null dims | max ‖P₆₄ − P‖₂ | "
              "old-output change max / mean | weights vs float64 run | old-task accuracy |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in effect:
        dims = "/".join(str(d) for d in r["null_dims"].values())
        acc = ", ".join(f"{a:.1f}" for a in r["old_task_accuracy"])
        lines.append(f"| {r['variant']} | {r['storage']} | {r['energy_kept']} | {r['eigenvectors_kept']:.2f} | "
                     f"{r['stats_bytes']:,} | {dims} | "
                     f"{r['projector_diff_2norm_max']:.2e} | {r['old_output_change_max']:.2e} / "
                     f"{r['old_output_change_mean']:.2e} | {r['weights_vs_float64_run']:.2e} | {acc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ViT-B-16,ViT-L-14", help="open_clip architectures for the bytes table")
    parser.add_argument("--steps", type=int, default=30, help="steps per task of the tiny model")
    parser.add_argument("--skip-effect", action="store_true", help="only the bytes table")
    parser.add_argument("--out", type=Path, default=Path("out/stats_storage"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    storage = storage_table([m for m in args.models.split(",") if m])
    effect = [] if args.skip_effect else null_space_effect(args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"storage": storage, "null_space_effect": effect}, indent=2))
    print(markdown(storage, effect))
    return 0


if __name__ == "__main__":
    sys.exit(main())
