"""What a search leaves behind: the trials table, a plot against the threshold, and the best config.

    trials.csv / trials.md / trials.json   one row per trial: searched values + validation metrics
    objective_vs_threshold.png             objective, task accuracy/forgetting and retention against ρ
    best.json                              the winning TrainConfig (flat): `gnsp learn|bench --config best.json`
    best_trial.json                        {"trial_id", "objective", "metrics", "config"} (also a valid --config)
    status.json                            queued | running | succeeded | failed (+ error)

The best trial is chosen among trials that learned every task: a trial ASHA stopped early has an
objective over fewer tasks, which is not comparable (less to forget).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any, Iterable

from gnsp_core.config import TrainConfig

from service.tuning.folder import SearchFolder, as_folder
from service.tuning.trial import trial_config

PARAMS = ("threshold", "cd_weight", "map_weight", "lr")
METRICS = ("seen_acc", "new_acc", "forgetting", "retention", "retrieval_r1", "objective")
COLUMNS = ("trial_id", "status", "tasks_done", *PARAMS, *METRICS, "time_s")
STATUS_FILE, BEST_FILE, BEST_TRIAL_FILE, PLOT_FILE = "status.json", "best.json", "best_trial.json", "objective_vs_threshold.png"


def trial_row(trial_id: str, params: dict[str, Any], metrics: dict[str, Any], status: str, num_tasks: int) -> dict:
    """One table row; `status` is the trial's (error, running, ...), refined to complete/stopped."""
    done = int(metrics.get("tasks_done", 0))
    if status == "terminated":
        status = "complete" if done >= num_tasks else "stopped"
    row = {"trial_id": trial_id, "status": status, "tasks_done": done, "time_s": metrics.get("time_total_s")}
    row.update({k: params.get(k) for k in PARAMS})
    row.update({k: metrics.get(k) for k in METRICS})
    return row


def sort_rows(rows: Iterable[dict]) -> list[dict]:
    """Complete trials by objective, then stopped ones (furthest first), then the rest."""
    order = {"complete": 0, "stopped": 1}
    return sorted(rows, key=lambda r: (order.get(r["status"], 2), -r["tasks_done"], -(r["objective"] or 0.0)))


def best_row(rows: list[dict]) -> dict | None:
    complete = [r for r in rows if r["status"] == "complete" and r["objective"] is not None]
    return max(complete, key=lambda r: r["objective"]) if complete else None


def write_table(rows: list[dict], out_dir: SearchFolder | Path) -> None:
    out, rows = as_folder(out_dir), sort_rows(rows)
    out.write_text("trials.json", json.dumps(rows, indent=1))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    out.write_text("trials.csv", text.getvalue())
    out.write_text("trials.md", markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    head = "| # | trial | status | tasks | ρ | CD | MAP | lr | seen acc % | new acc % | forgetting | retention | objective |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, r in enumerate(rows, 1):
        cells = [i, r["trial_id"], r["status"], r["tasks_done"], _f(r["threshold"], 3), _f(r["cd_weight"], 2),
                 _f(r["map_weight"], 2), _f(r["lr"], "e"), _f(r["seen_acc"], 1), _f(r["new_acc"], 1),
                 _f(r["forgetting"], 1), _f(r["retention"], 3), _f(r["objective"], 3)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _f(value: Any, digits: int | str) -> str:
    if value is None:
        return "-"
    return f"{value:.1e}" if digits == "e" else f"{value:.{digits}f}"


def write_best(row: dict, base: TrainConfig, out_dir: SearchFolder | Path) -> TrainConfig:
    """best.json (the flat TrainConfig) and best_trial.json (config + metrics)."""
    out, config = as_folder(out_dir), trial_config(base, row)
    out.write_text(BEST_FILE, json.dumps(config.to_dict(), indent=2))
    out.write_text(BEST_TRIAL_FILE, json.dumps(
        {"trial_id": row["trial_id"], "objective": row["objective"], "metrics": row, "config": config.to_dict()}, indent=2))
    return config


def plot_trials(rows: list[dict], out_dir: SearchFolder | Path) -> None:
    """PLOT_FILE: three panels against ρ (log): objective; seen accuracy and forgetting; retention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("objective", "objective (harmonic mean)"), ("seen_acc", "validation accuracy, seen tasks (%)"),
              ("retention", "zero-shot retention (R@1 / pre-trained)"))
    best = best_row(rows)
    for ax, (key, label) in zip(axes, panels):
        for status, style in (("complete", dict(c="tab:blue")), ("stopped", dict(facecolors="none", edgecolors="grey"))):
            pts = [(r["threshold"], r[key]) for r in rows if r["status"] == status and r[key] is not None]
            if pts:
                ax.scatter(*zip(*pts), label=status if status == "complete" else "stopped by ASHA (fewer tasks)", **style)
        if key == "seen_acc":
            pts = [(r["threshold"], r["forgetting"]) for r in rows if r["status"] == "complete" and r["forgetting"] is not None]
            if pts:
                ax.scatter(*zip(*pts), marker="v", c="tab:red", label="forgetting (pts)")
        if best is not None:
            ax.scatter([best["threshold"]], [best[key]], marker="*", s=250, c="gold", edgecolors="k", label="best", zorder=3)
        ax.set(xscale="log", xlabel="null-space threshold ρ (energy, log)", ylabel=label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=110, format="png")
    plt.close(fig)
    as_folder(out_dir).write_bytes(PLOT_FILE, image.getvalue())


def write_status(out_dir: SearchFolder | Path, status: str, error: str | None = None) -> None:
    as_folder(out_dir).write_text(STATUS_FILE, json.dumps({"status": status, "error": error, "updated": time.time()}))


def read_results(out_dir: SearchFolder | str | Path) -> dict[str, Any]:
    """Status, trials table and best trial of a search folder (for `GET /v1/tune/{job_id}`)."""
    out = as_folder(out_dir)
    status = out.read_json(STATUS_FILE) or {"status": "queued"}
    return {**status, "trials": out.read_json("trials.json") or [], "best": out.read_json(BEST_TRIAL_FILE)}
