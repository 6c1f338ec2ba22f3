"""The demo's story: the same tasks learned by each method side by side, what each kept and lost.

One column per method: each task right after it was learned → after the last task, then the
held-out suite, retrieval and the modality gap after the last task, and BWT; the pre-trained column
and chance are what every number is read against. Both demo paths print it.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean

from gnsp_core.data import Task
from gnsp_core.data.heldout import PAIRS_NAME, HeldoutSuite

from service.cli.demo_measure import Measures


@dataclass
class MethodRun:
    """One method over the sequence: each task's accuracy just after learning it, and the end."""

    learned: dict[str, float]
    end: Measures
    version: int | None = None


def chance_levels(tasks: list[Task], suite: HeldoutSuite) -> dict[str, float]:
    """Top-1 accuracy (%) of guessing: each task over its own labels; the suite pooled like its
    accuracy (each set guessed over its own labels); retrieval's R@1 of a random ranking, 1 / pairs."""
    sizes = suite.sizes
    sets = suite.tasks
    pooled = sum(sizes[t.name] * 100 / len(t.classnames) for t in sets) / sum(sizes[t.name] for t in sets)
    return {t.name: 100 / len(t.classnames) for t in tasks} | {"heldout": pooled, "retrieval": 100 / sizes[PAIRS_NAME]}


def bwt(run: MethodRun, tasks: list[str]) -> float | None:
    """Mean change of each earlier task from just after learning it to the end (negative: forgotten)."""
    earlier = tasks[:-1]
    return fmean(run.end.tasks[t] - run.learned[t] for t in earlier) if earlier else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _recall(measures: Measures) -> str:
    r = measures.retrieval
    return "n/a" if r is None else f"{r['R@1']:.1f} / {r['R@5']:.1f}"


def story_rows(tasks: list[str], chance: dict[str, float], pretrained: Measures, runs: dict[str, MethodRun],
               heldout_items: int, retrieval_pairs: int | None) -> list[tuple[str, ...]]:
    """The table's rows, header first."""
    rows = [("accuracy (%)", "chance", "pre-trained", *runs)]
    for i, name in enumerate(tasks):
        cells = [_pct(r.learned[name]) if i == len(tasks) - 1 else f"{_pct(r.learned[name])} → {_pct(r.end.tasks[name])}"
                 for r in runs.values()]
        rows.append((f"{name} (task {i + 1}): learned → end", _pct(chance[name]), _pct(pretrained.tasks[name]), *cells))
    rows.append((f"held-out suite, zero-shot ({heldout_items} items)", _pct(chance["heldout"]), _pct(pretrained.heldout),
                 *(_pct(r.end.heldout) for r in runs.values())))
    if retrieval_pairs:
        rows.append((f"retrieval R@1 / R@5 ({retrieval_pairs} pairs)", _pct(chance.get("retrieval")), _recall(pretrained),
                     *(_recall(r.end) for r in runs.values())))
    rows.append(("modality gap ‖Δ‖", "", _gap(pretrained.gap), *(_gap(r.end.gap) for r in runs.values())))
    rows.append(("BWT: earlier tasks, end − learned", "", "", *(_signed(bwt(r, tasks)) for r in runs.values())))
    return rows


def _gap(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def print_story(model: str, tasks: list[str], chance: dict[str, float], pretrained: Measures,
                runs: dict[str, MethodRun], heldout_items: int, retrieval_pairs: int | None) -> None:
    """The side-by-side table and one sentence per method on what it kept and lost."""
    print(f"\n{model} learned {' → '.join(tasks)} once per method ({', '.join(runs)}), from the same "
          "pre-trained weights, on the same data and settings.")
    rows = story_rows(tasks, chance, pretrained, runs, heldout_items, retrieval_pairs)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print()
    for method, run in runs.items():
        print("  " + verdict(method, run, tasks, pretrained))


def verdict(method: str, run: MethodRun, tasks: list[str], pretrained: Measures) -> str:
    """What a method kept and lost, in words."""
    parts = []
    change = bwt(run, tasks)
    if change is not None and abs(change) < 0.05:
        parts.append("earlier tasks kept their accuracy through the later ones")
    elif change is not None:
        parts.append(f"earlier tasks {'lost' if change < 0 else 'gained'} {abs(change):.1f} points through the later ones")
    if run.end.heldout is not None and pretrained.heldout is not None:
        drop = run.end.heldout - pretrained.heldout
        parts.append(f"held-out zero-shot {pretrained.heldout:.1f} → {run.end.heldout:.1f} ({drop:+.1f})")
    if run.end.retrieval and pretrained.retrieval:
        parts.append(f"retrieval R@1 {pretrained.retrieval['R@1']:.1f} → {run.end.retrieval['R@1']:.1f}")
    return f"{method}: " + "; ".join(parts) + "."
