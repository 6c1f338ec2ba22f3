"""The stability-plasticity frontier of GNSP on gnsp-mini: BWT against plasticity, per setting.

Exact update projection keeps an old task's layer outputs fixed, but the smaller the null space
the less a new task can move. This maps that trade-off over the null-space threshold rule and
value (`cutoff` a: eigenvalues <= a * lambda_min are the null space; `energy` rho: the eigen-tail
holding < rho of the energy is) and the projected scope (`vision_mlp`: the vision maps, the text
projection frozen after task 1; `all`: every trainable map, projected), all with the update
projected (`gnsp-exact`'s target). Every setting runs the same task sequence from the same
pre-trained weights (`gnsp_core.bench`). `plasticity` = mean of the accuracy matrix's diagonal
(each task right after learning it); stability = BWT. The chosen setting is the frontier point
with the highest plasticity among those with BWT >= --min-bwt (the largest BWT if none has).

Prints a markdown table; writes frontier.json, table.md, frontier.png and one heatmap per setting:
    python benchmarks/gnsp_ablation.py --out out/gnsp_frontier
Single knobs against the paper recipe (`--variants gnsp,gnsp-no-distill,...`) stay available.
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
from gnsp_core.data.builtin import DEFAULT_SEQUENCE
from gnsp_core.data.heldout import load_heldout_suite
from gnsp_core.data.reference import load_reference_pairs
from gnsp_core.models import DEFAULT_MODEL, ModelSpec, load_model, recommended_training
from gnsp_core.models.default import build_default_model

TEXT_TOO = r"^(visual\.head\.mlp\.(fc1|fc2)|text\.proj)$"
EXACT = dict(projection_target="update")
GRID_RULES = (("cutoff", 10.0), ("cutoff", 1e4), ("energy", 0.05), ("energy", 0.3))
GRID_SCOPES = ("vision_mlp", "all")


def _grid() -> dict[str, tuple[str, dict[str, Any]]]:
    grid = {}
    for rule, value in GRID_RULES:
        for scope in GRID_SCOPES:
            what = f"a = {value:g}" if rule == "cutoff" else f"ρ = {value:g}"
            grid[f"exact-{rule}-{value:g}-{scope}"] = (
                f"update projected, {rule} {what}, scope {scope}",
                dict(EXACT, projection_rule=rule, projection_threshold=value, projection_scope=scope))
    return grid


KNOBS: dict[str, tuple[str, dict[str, Any]]] = {
    "finetune": ("plain fine-tuning of the heads (reference point)", dict(method="finetune")),
    "finetune-lr3e-3": ("plain fine-tuning at learning rate 3e-3", dict(method="finetune", lr=3e-3)),
    "zscl": ("ZSCL: distillation from the pre-trained model on the reference pairs (reference point)",
             dict(method="zscl")),
    "gnsp": ("paper recipe: gradient projected, ρ = 0.15, vision MLP maps, CD 1.0, MAP 0.75", {}),
    "gnsp-no-projection": ("cut-off a = 1e12, above every eigenvalue ratio: the null space is the whole space "
                           "(projection off)", dict(projection_rule="cutoff", projection_threshold=1e12)),
    "gnsp-rho0.5": ("ρ=0.5: a larger null space", dict(projection_threshold=0.5)),
    "gnsp-no-distill": ("CD and MAP weights 0 (projection only)", dict(cd_weight=0.0, map_weight=0.0)),
    "gnsp-text-proj": ("the text projection trains too, projected like the vision maps",
                       dict(projection_scope=TEXT_TOO)),
    "gnsp-lr3e-3": ("learning rate 3e-3 instead of 1e-3", dict(lr=3e-3)),
}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {**KNOBS, **_grid()}
FRONTIER = ["finetune", *_grid()]


def variant_configs(names: list[str], base: TrainConfig) -> dict[str, TrainConfig]:
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return {n: base.replace(**{"method": "gnsp", **VARIANTS[n][1]}) for n in names}


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per setting (means over seeds when there are several)."""
    tasks = results["tasks"]
    rows = []
    for name, r in results["methods"].items():
        rows.append({"variant": name, "change": VARIANTS[name][0], "settings": VARIANTS[name][1],
                     "transfer": r["transfer"], "avg": r["avg"], "last": r["last"], "bwt": r["bwt"],
                     "plasticity": r["plasticity"], "heldout_last": r["heldout_acc"][-1],
                     "retrieval_r1_last": r["retrieval_r1"][-1], "step_ms": r["step_ms"],
                     "final": dict(zip(tasks + results["eval"], r["acc"][-1]))})
    return rows


def pareto(rows: list[dict[str, Any]]) -> list[str]:
    """Settings no other setting beats on both plasticity and BWT (the frontier), by plasticity."""
    front = [r for r in rows if not any(o["plasticity"] >= r["plasticity"] and o["bwt"] >= r["bwt"]
                                        and (o["plasticity"], o["bwt"]) != (r["plasticity"], r["bwt"]) for o in rows)]
    return [r["variant"] for r in sorted(front, key=lambda r: r["plasticity"])]


def choose(rows: list[dict[str, Any]], min_bwt: float) -> dict[str, Any]:
    """Among the projected-update settings: the most plastic with BWT >= min_bwt, else the most stable."""
    exact = [r for r in rows if r["settings"].get("projection_target") == "update"]
    if not exact:
        raise SystemExit("no exact (update-projected) setting ran: add some to --variants")
    stable = [r for r in exact if r["bwt"] >= min_bwt]
    if stable:
        return max(stable, key=lambda r: (r["plasticity"], r["bwt"]))
    return max(exact, key=lambda r: (r["bwt"], r["plasticity"]))


def markdown(rows: list[dict[str, Any]], front: list[str], chosen: str) -> str:
    lines = ["| setting | change | plasticity | BWT | Transfer | Avg | Last | held-out last | R@1 last | step ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r["plasticity"]):
        mark = " **(chosen)**" if r["variant"] == chosen else " (frontier)" if r["variant"] in front else ""
        lines.append(f"| {r['variant']}{mark} | {r['change']} | {r['plasticity']:.1f} | {r['bwt']:.1f} "
                     f"| {r['transfer']:.1f} | {r['avg']:.1f} | {r['last']:.1f} | {r['heldout_last']:.1f} "
                     f"| {r['retrieval_r1_last']:.1f} | {r['step_ms']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], front: list[str], chosen: str, path: Path) -> None:
    """BWT (stability) against plasticity, every setting a labelled point, the frontier a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r["variant"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in rows:
        exact = r["settings"].get("projection_target") == "update"
        marker = ("s" if r["settings"].get("projection_scope") == "all" else "o") if exact else "^"
        ax.scatter(r["plasticity"], r["bwt"], marker=marker, s=70 if r["variant"] == chosen else 35,
                   color="crimson" if r["variant"] == chosen else "tab:blue" if exact else "grey", zorder=3)
        ax.annotate(r["variant"].removeprefix("exact-"), (r["plasticity"], r["bwt"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.plot([by_name[n]["plasticity"] for n in front], [by_name[n]["bwt"] for n in front], "--", color="black",
            linewidth=0.8, label="frontier")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("plasticity: mean accuracy right after learning each task (%)")
    ax.set_ylabel("BWT (points; 0 = nothing forgotten)")
    ax.set_title("GNSP stability-plasticity frontier on gnsp-mini (o vision_mlp, □ all, ▲ reference)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    recommended = recommended_training(DEFAULT_MODEL)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(DEFAULT_SEQUENCE), help="default: gnsp bench's default sequence")
    p.add_argument("--variants", default=",".join(FRONTIER), help=f"from {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=recommended.get("steps", 30))
    p.add_argument("--lr", type=float, default=recommended.get("lr", 1e-3))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--min-bwt", type=float, default=-1.0, help="stability a chosen setting must keep")
    p.add_argument("--max-train-per-class", type=int, default=None, help="default: the data set's own cap, as gnsp bench")
    p.add_argument("--max-test-per-class", type=int, default=None, help="default: the data set's own cap, as gnsp bench")
    p.add_argument("--reference-limit", type=int, default=0,
                   help="seeded subset of the reference pairs (each run computes its pool's features once); "
                        "0: all of them, as gnsp bench")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    build_default_model()
    loaded = load_model(ModelSpec(name=DEFAULT_MODEL))
    tasks = [load_task(t, max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class)
             for t in args.tasks.split(",") if t]
    base = TrainConfig.from_dict({**recommended_training(DEFAULT_MODEL), "steps": args.steps, "lr": args.lr,
                                  "device": "cpu"})
    configs = variant_configs([v for v in args.variants.split(",") if v], base)
    bar = tqdm(total=sum(c.steps for c in configs.values()) * len(tasks) * args.seeds, unit="step", desc="frontier")

    def on_progress(name: str, prog) -> None:
        if prog.phase == "train":
            bar.update(1)
            bar.set_description(f"{name} · {prog.task}")

    start = time.perf_counter()
    results = run_bench(loaded, tasks, [], configs, args.out, suite=load_heldout_suite(),
                        reference=load_reference_pairs(limit=args.reference_limit or None),
                        progress=on_progress, seeds=args.seeds)
    bar.close()
    rows = summarise(results)
    front, chosen = pareto(rows), choose(rows, args.min_bwt)
    table = markdown(rows, front, chosen["variant"])
    print(table)
    print(f"\nchosen for gnsp-exact: {chosen['variant']} {chosen['settings']}")
    print(f"{len(rows)} settings in {time.perf_counter() - start:.0f} s")
    (args.out / "table.md").write_text(table + "\n", encoding="utf-8")
    record = {"args": vars(args) | {"out": str(args.out)}, "rows": rows, "frontier": front,
              "chosen": {"variant": chosen["variant"], "settings": chosen["settings"]},
              "seconds": time.perf_counter() - start}
    (args.out / "frontier.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    plot(rows, front, chosen["variant"], args.out / "frontier.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
