"""Seeds and intervals: one method's runs over several seeds, summarised as mean ± a 95 % t-interval.

A single run of a continual-learning benchmark on a small model moves by several points with the
data and reference order alone, so a difference between methods means something only next to its
interval. Each summary is the Student-t interval of the mean over the seeds,
mean ± t_{0.975, n-1} · s / √n (s the sample standard deviation); with one seed there is no
interval (`half_width` is None).
"""

from __future__ import annotations

import math
from statistics import fmean, stdev
from typing import Any, Sequence

from scipy import stats

CONFIDENCE = 0.95
SUMMARY_KEYS = ("transfer", "avg", "last", "bwt", "fwt", "plasticity", "train_s", "step_ms")
"""Scalars of a run (`gnsp_core.bench.run_method`) that every aggregate carries."""
ROW_KEYS = ("heldout_acc", "retrieval_r1", "retrieval_r5")
"""Held-out suite numbers a run keeps per row (zero-shot first); their last row is a summary."""


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean and Student-t confidence interval of the mean of `values` (None entries are skipped)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "half_width": None, "low": None, "high": None, "std": None, "n": 0}
    mean = fmean(xs)
    if len(xs) < 2:
        return {"mean": mean, "half_width": None, "low": None, "high": None, "std": None, "n": len(xs)}
    sd = stdev(xs)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return {"mean": mean, "half_width": half, "low": mean - half, "high": mean + half, "std": sd, "n": len(xs)}


def run_scalars(run: dict[str, Any], tasks: Sequence[str], evals: Sequence[str]) -> dict[str, float | None]:
    """The named scalars of one run: the summaries; after the last task, the held-out suite's pooled
    accuracy and retrieval (`heldout_acc`, `retrieval_r1`, `retrieval_r5`), each eval set's accuracy
    (`heldout:<set>`) and each directional recall (`retrieval:<key>`), when the run measured them."""
    out: dict[str, float | None] = {k: run.get(k) for k in SUMMARY_KEYS if k in run}
    out.update({k: run[k][-1] for k in ROW_KEYS if run.get(k)})
    final = run["acc"][-1]
    for j, name in enumerate(evals):
        out[f"heldout:{name}"] = final[len(tasks) + j]
    for key, value in (run["retrieval"][-1] if run.get("retrieval") else {}).items():
        out[f"retrieval:{key}"] = value
    return out


def aggregate_runs(runs: list[dict[str, Any]], tasks: Sequence[str], evals: Sequence[str]) -> dict[str, Any]:
    """The aggregate of one method's per-seed runs: every summary's mean at the top level (the shape
    of a single run, so single-seed readers keep working), `ci` with each scalar's interval and
    `acc_ci` with the half-width of every accuracy-matrix cell."""
    if not runs:
        raise ValueError("aggregate_runs needs at least one run")
    per_seed = [run_scalars(r, tasks, evals) for r in runs]
    names = list(dict.fromkeys(k for s in per_seed for k in s))
    ci = {k: t_interval([s.get(k) for s in per_seed]) for k in names}
    cells = [[t_interval([r["acc"][i][j] for r in runs]) for j in range(len(runs[0]["acc"][0]))]
             for i in range(len(runs[0]["acc"]))]
    first = runs[0]
    out = {k: ci[k]["mean"] for k in SUMMARY_KEYS if k in ci}
    out.update(
        acc=[[c["mean"] for c in row] for row in cells],
        acc_ci=[[c["half_width"] for c in row] for row in cells],
        modality_gap=_mean_lists([r.get("modality_gap") or [] for r in runs]),
        modality_gap_cosine=_mean_lists([r.get("modality_gap_cosine") or [] for r in runs]),
        **{k: _mean_lists([r[k] for r in runs]) for k in ROW_KEYS if all(r.get(k) for r in runs)},
        **({"retrieval": _mean_recall_rows([r["retrieval"] for r in runs])} if all(r.get("retrieval") for r in runs)
           else {}),
        config=first["config"], seeds=[r["config"]["seed"] for r in runs], ci=ci, confidence=CONFIDENCE,
    )
    return out


def _mean_recall_rows(runs: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per row, the mean of each recall over the runs."""
    return [{key: fmean(row[key] for row in rows) for key in rows[0]} for rows in zip(*runs)]


def _mean_lists(lists: list[list[float | None]]) -> list[float | None]:
    """Element-wise mean of equally long lists (None where any run has None)."""
    if not lists or not lists[0]:
        return []
    return [None if any(v is None for v in col) else fmean(col) for col in zip(*lists)]


def format_interval(summary: dict[str, Any] | None, digits: int = 1) -> str:
    """`mean ± half` (just the mean for one seed; `n/a` when there is none)."""
    if not summary or summary.get("mean") is None:
        return "n/a"
    if summary.get("half_width") is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['half_width']:.{digits}f}"


def separated(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two intervals do not overlap (a conservative test that the means differ)."""
    if a.get("low") is None or b.get("low") is None:
        return False
    return a["low"] > b["high"] or b["low"] > a["high"]
