"""The before/after table both demo paths print, and the chance level of each of its rows."""

from __future__ import annotations

from gnsp_core.data import Task
from gnsp_core.data.heldout import PAIRS_NAME, HeldoutSuite


def chance_levels(tasks: list[Task], suite: HeldoutSuite) -> dict[str, float]:
    """Top-1 accuracy (%) of guessing: what each row of the table is read against. The suite's is
    pooled like its accuracy (each set guessed over its own labels); retrieval's is R@1 of a random
    ranking, 1 / pairs."""
    sizes = suite.sizes
    pooled = sum(sizes[t.name] * 100 / len(t.classnames) for t in suite.tasks) / sum(sizes[t.name] for t in suite.tasks)
    return {t.name: 100 / len(t.classnames) for t in tasks} | {"heldout": pooled, "retrieval": 100 / sizes[PAIRS_NAME]}


def print_table(before: dict, after: dict, chance: dict[str, float], suite_sizes: dict[str, int]) -> None:
    """Each learned task, the held-out suite, retrieval and the gap: chance, before and after.

    `before` and `after` hold `tasks` (name -> top-1), `heldout` (suite top-1 pooled over its items),
    `retrieval_r1` (mean of both directions) and `gap`."""
    items = sum(n for name, n in suite_sizes.items() if name != PAIRS_NAME)
    rows = [("task", "chance", "before", "after")]
    for name in before["tasks"]:
        rows.append((f"{name} (learned)", f"{chance[name]:.1f}", f"{before['tasks'][name]:.1f}", f"{after['tasks'][name]:.1f}"))
    rows.append((f"held-out suite, {items} items (zero-shot)", f"{chance['heldout']:.1f}", f"{before['heldout']:.1f}",
                 f"{after['heldout']:.1f}"))
    rows.append((f"retrieval R@1, {suite_sizes[PAIRS_NAME]} held-out pairs", f"{chance['retrieval']:.1f}",
                 f"{before['retrieval_r1']:.1f}", f"{after['retrieval_r1']:.1f}"))
    rows.append(("modality gap ‖Δ‖", "", f"{before['gap']['norm']:.3f}", f"{after['gap']['norm']:.3f}"))
    cos = after["gap"].get("cosine")
    rows.append(("gap direction cos(Δ, Δ₀)", "", "1.000", "n/a" if cos is None else f"{cos:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
