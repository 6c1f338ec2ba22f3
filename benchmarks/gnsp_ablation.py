"""Which GNSP knob costs plasticity on gnsp-mini: one change at a time against the paper recipe.

Every variant runs the same task sequence from the same pre-trained weights (`gnsp_core.bench`),
so the columns differ only by the change named in the row. `plasticity` is the mean of the
accuracy matrix's diagonal (each task right after learning it); `forgetting` is -BWT.
Prints a markdown table, writes results.json, table.md, ablation.png and one heatmap per variant:
    python benchmarks/gnsp_ablation.py --out out/gnsp_ablation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gnsp_core.bench import run_bench
from gnsp_core.config import TrainConfig
from gnsp_core.data import load_task
from gnsp_core.models.default import build_default_model
from gnsp_core.models import DEFAULT_MODEL, ModelSpec, load_model
from gnsp_core.data.reference import load_heldout_task, load_reference_pairs

TEXT_TOO = r"^(visual\.head\.mlp\.(fc1|fc2)|text\.proj)$"
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "finetune": ("plain fine-tuning of the heads (reference point)", dict(method="finetune")),
    "finetune-lr3e-3": ("plain fine-tuning at learning rate 3e-3", dict(method="finetune", lr=3e-3)),
    "gnsp": ("paper recipe: ρ=0.15, vision MLP maps, CD 1.0, MAP 0.75", {}),
    "gnsp-no-projection": ("cut-off a=1e12, above every eigenvalue ratio: the null space is the whole space "
                           "(projection off)", dict(projection_rule="cutoff", projection_threshold=1e12)),
    "gnsp-rho0.5": ("ρ=0.5: a larger null space", dict(projection_threshold=0.5)),
    "gnsp-no-distill": ("CD and MAP weights 0 (projection only)", dict(cd_weight=0.0, map_weight=0.0)),
    "gnsp-text-proj": ("the text projection trains too, projected like the vision maps",
                       dict(projection_scope=TEXT_TOO)),
    "gnsp-lr3e-3": ("learning rate 3e-3 instead of 1e-3", dict(lr=3e-3)),
}


def variant_configs(names: list[str], base: TrainConfig) -> dict[str, TrainConfig]:
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return {n: base.replace(**{"method": "gnsp", **VARIANTS[n][1]}) for n in names}


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    tasks = results["tasks"]
    rows = []
    for name, r in results["methods"].items():
        diagonal = [r["acc"][i + 1][i] for i in range(len(tasks))]
        rows.append({"variant": name, "change": VARIANTS[name][0], "transfer": r["transfer"], "avg": r["avg"],
                     "last": r["last"], "bwt": r["bwt"], "plasticity": sum(diagonal) / len(diagonal),
                     "heldout_last": r["acc"][-1][-1], "step_ms": r["step_ms"],
                     "final": dict(zip(tasks + results["eval"], r["acc"][-1]))})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | change | Transfer | Avg | Last | BWT | plasticity | held-out last | step ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['change']} | {r['transfer']:.1f} | {r['avg']:.1f} | {r['last']:.1f} "
                     f"| {r['bwt']:.1f} | {r['plasticity']:.1f} | {r['heldout_last']:.1f} | {r['step_ms']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ["transfer", "avg", "last", "plasticity", "bwt"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(2 + 1.3 * len(rows), 4))
    for k, key in enumerate(keys):
        ax.bar(x + (k - 2) * 0.16, [r[key] for r in rows], 0.16, label=key)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, [r["variant"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("%")
    ax.set_title("GNSP ablation on gnsp-mini (one change per bar group)")
    ax.legend(ncol=len(keys), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="digits,textiles,mnist")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-train-per-class", type=int, default=64)
    p.add_argument("--max-test-per-class", type=int, default=20)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    build_default_model()
    loaded = load_model(ModelSpec(name=DEFAULT_MODEL))
    tasks = [load_task(t, max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class)
             for t in args.tasks.split(",") if t]
    configs = variant_configs([v for v in args.variants.split(",") if v],
                              TrainConfig(steps=args.steps, lr=args.lr, device="cpu"))
    bar = tqdm(total=sum(c.steps for c in configs.values()) * len(tasks), unit="step", desc="ablation")

    def on_progress(name: str, prog) -> None:
        if prog.phase == "train":
            bar.update(1)
            bar.set_description(f"{name} · {prog.task}")

    start = time.perf_counter()
    results = run_bench(loaded, tasks, [load_heldout_task()], configs, args.out, reference=load_reference_pairs(),
                        progress=on_progress)
    bar.close()
    rows = summarise(results)
    table = markdown(rows)
    print(table)
    print(f"\n{len(rows)} variants in {time.perf_counter() - start:.0f} s")
    (args.out / "table.md").write_text(table + "\n", encoding="utf-8")
    (args.out / "ablation.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows},
                                                      indent=2), encoding="utf-8")
    plot(rows, args.out / "ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
