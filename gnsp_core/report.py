"""Results people look at: markdown tables and PNG heatmaps of accuracy matrices.

Over several seeds every number is the mean with its 95 % t-interval (`mean ± half-width`,
`gnsp_core.bench_stats`); over one seed, the number alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gnsp_core.bench_stats import format_interval, separated
from gnsp_core.metrics import METRIC_FORMULAS

SUMMARY_COLUMNS = (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last"), ("bwt", "BWT"),
                   ("plasticity", "plasticity"))
HELDOUT_COLUMNS = (("heldout_acc", "held-out top-1"), ("retrieval_r1", "retrieval R@1"))
"""Held-out suite summaries, per row in a run; the table shows the last row (and the zero-shot one)."""
REFERENCE_METHOD = "finetune"


def _interval(r: dict[str, Any], key: str, digits: int = 1) -> str:
    """A run's summary as `mean ± half-width`, from its `ci` when it has one."""
    summary = r.get("ci", {}).get(key)
    if summary is None:
        value = r.get(key)
        summary = None if value is None else {"mean": value}
    return format_interval(summary, digits)


def summary_table(results: dict[str, Any]) -> str:
    """One row per method: MTIL metrics and plasticity, the held-out suite after the last task
    (zero-shot before any task in brackets), the final modality gap and the training cost."""
    columns = SUMMARY_COLUMNS + HELDOUT_COLUMNS
    head = "| method | " + " | ".join(t for _, t in columns) + " | gap ‖Δ‖ (last) | train s | step ms |"
    lines = [head, "|" + "---|" * (len(columns) + 4)]
    for name, r in results["methods"].items():
        gap = r["modality_gap"][-1] if r["modality_gap"] else None
        cells = [_interval(r, key) for key, _ in SUMMARY_COLUMNS]
        cells += [f"{_interval(r, key)} ({r[key][0]:.1f})" if r.get(key) else "n/a" for key, _ in HELDOUT_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'n/a' if gap is None else f'{gap:.3f}'} "
                     f"| {_interval(r, 'train_s', 0)} | {_interval(r, 'step_ms', 0)} |")
    lines.append("")
    lines.extend(f"- {k}: {METRIC_FORMULAS[k]}" for k in ("transfer", "avg", "last", "bwt") if k in METRIC_FORMULAS)
    lines.append("- plasticity: mean_{j=1..T} A[j][j]  (each task right after learning it)")
    lines.append(_seeds_note(results))
    if results.get("sizes"):
        lines.append("- test items: " + ", ".join(f"{k} {v}" for k, v in results["sizes"].items()))
    return "\n".join(lines)


def _seeds_note(results: dict[str, Any]) -> str:
    seeds = results.get("seeds", 1)
    if seeds < 2:
        return "- one seed: no intervals (`gnsp bench --seeds N` gives mean ± 95 % CI)"
    return f"- {seeds} seeds: mean ± half-width of the 95 % t-interval of the mean"


def heldout_table(results: dict[str, Any]) -> str:
    """Held-out accuracy and retrieval after the last task, one row per method ('' when none measured)."""
    keys = list(dict.fromkeys(k for r in results["methods"].values() for k in r.get("ci", {})
                              if k.startswith(("heldout:", "retrieval:"))))
    if not keys:
        return ""
    lines = ["| method | " + " | ".join(k.replace(":", " ", 1) for k in keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, r in results["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_interval(r, k) for k in keys) + " |")
    return "\n".join(lines)


def separation_notes(results: dict[str, Any], reference: str = REFERENCE_METHOD) -> list[str]:
    """For each method, which summaries' intervals do not overlap the reference method's."""
    base = results["methods"].get(reference)
    if base is None or results.get("seeds", 1) < 2:
        return []
    notes = []
    for name, r in results["methods"].items():
        if name == reference:
            continue
        keys = [title for key, title in SUMMARY_COLUMNS + HELDOUT_COLUMNS
                if separated(r["ci"].get(key, {}), base["ci"].get(key, {}))]
        notes.append(f"- {name} vs {reference}: intervals separate on {', '.join(keys) if keys else 'no summary'}")
    return notes


def matrix_table(results: dict[str, Any], method: str) -> str:
    columns = results["tasks"] + [f"{e} (held-out)" for e in results["eval"]]
    r = results["methods"][method]
    half = r.get("acc_ci")
    lines = ["| after | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for i, row in enumerate(r["acc"]):
        label = "zero-shot" if i == 0 else results["tasks"][i - 1]
        cells = [format_interval({"mean": v, "half_width": half[i][j] if half else None}) for j, v in enumerate(row)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    parts = [f"# gnsp bench: {results['model']}", "", summary_table(results), ""]
    heldout = heldout_table(results)
    if heldout:
        parts += ["## held-out after the last task (%)", "", heldout, ""]
    notes = separation_notes(results)
    if notes:
        parts += ["## separation from fine-tuning (95 % intervals that do not overlap)", "", *notes, ""]
    for method in results["methods"]:
        parts += [f"## {method}: accuracy matrix (%)", "", matrix_table(results, method), ""]
    path.write_text("\n".join(parts))
    return path


def plot_heatmap(results: dict[str, Any], method: str, path: Path) -> Path:
    """The accuracy matrix as a heatmap of the mean; each cell reads `mean` and, over several seeds, `±half`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    r = results["methods"][method]
    acc = np.array(r["acc"])
    half = r.get("acc_ci")
    columns = results["tasks"] + [f"{e}*" for e in results["eval"]]
    rows = ["zero-shot"] + results["tasks"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.6 * len(rows)))
    im = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [f"after {r}" if i else r for i, r in enumerate(rows)])
    for (i, j), v in np.ndenumerate(acc):
        h = half[i][j] if half else None
        text = f"{v:.0f}" if h is None else f"{v:.0f}\n±{h:.0f}"
        ax.text(j, i, text, ha="center", va="center", color="white" if v < 60 else "black", fontsize=7)
    seeds = results.get("seeds", 1)
    what = "accuracy (%)" if seeds < 2 else f"mean accuracy (%) ± 95 % CI over {seeds} seeds"
    ax.set_title(f"{method}: {what} (* = held-out)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
