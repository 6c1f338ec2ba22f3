"""Results people look at: markdown tables and PNG heatmaps of accuracy matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gnsp_core.metrics import METRIC_FORMULAS


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def _last(r: dict[str, Any], key: str) -> float | None:
    values = r.get(key)
    return values[-1] if values else None


def summary_table(results: dict[str, Any]) -> str:
    """One row per method: MTIL metrics, the held-out suite after the last task (zero-shot before
    any task in brackets), the final modality gap and the training cost."""
    head = "| method | Transfer | Avg | Last | BWT | held-out top-1 | retrieval R@1 | gap ‖Δ‖ (last) | train s | step ms |"
    lines = [head, "|" + "---|" * 10]
    for name, r in results["methods"].items():
        gap = r["modality_gap"][-1] if r["modality_gap"] else None
        held = " | ".join(f"{_fmt(_last(r, k))} ({_fmt(r[k][0])})" if r.get(k) else "n/a"
                          for k in ("heldout_acc", "retrieval_r1"))
        lines.append(f"| {name} | {_fmt(r['transfer'])} | {_fmt(r['avg'])} | {_fmt(r['last'])} | {_fmt(r['bwt'])} "
                     f"| {held} | {'n/a' if gap is None else f'{gap:.3f}'} | {r['train_s']:.0f} | {r['step_ms']:.0f} |")
    lines.append("")
    lines.extend(f"- {k}: {METRIC_FORMULAS[k]}" for k in ("transfer", "avg", "last", "bwt") if k in METRIC_FORMULAS)
    if results.get("sizes"):
        lines.append("- test items: " + ", ".join(f"{k} {v}" for k, v in results["sizes"].items()))
    return "\n".join(lines)


def matrix_table(results: dict[str, Any], method: str) -> str:
    columns = results["tasks"] + [f"{e} (held-out)" for e in results["eval"]]
    lines = ["| after | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for i, row in enumerate(results["methods"][method]["acc"]):
        label = "zero-shot" if i == 0 else results["tasks"][i - 1]
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    parts = [f"# gnsp bench: {results['model']}", "", summary_table(results), ""]
    for method in results["methods"]:
        parts += [f"## {method}: accuracy matrix (%)", "", matrix_table(results, method), ""]
    path.write_text("\n".join(parts))
    return path


def plot_heatmap(results: dict[str, Any], method: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    acc = np.array(results["methods"][method]["acc"])
    columns = results["tasks"] + [f"{e}*" for e in results["eval"]]
    rows = ["zero-shot"] + results["tasks"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.6 * len(rows)))
    im = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [f"after {r}" if i else r for i, r in enumerate(rows)])
    for (i, j), v in np.ndenumerate(acc):
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    ax.set_title(f"{method}: accuracy (%) (* = held-out)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
