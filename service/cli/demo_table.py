"""The before/after table both demo paths print, and the chance level of each of its rows."""

from __future__ import annotations

from gnsp_core.data import Task


def chance_levels(tasks: list[Task], heldout: Task) -> dict[str, float]:
    """Top-1 accuracy (%) of guessing: what each row of the table is read against."""
    return {t.name: 100 / len(t.classnames) for t in tasks} | {"heldout": 100 / len(heldout.classnames)}


def print_table(before: dict, after: dict, chance: dict[str, float]) -> None:
    """Each learned task, the held-out photos and the gap: chance, before and after."""
    rows = [("task", "chance", "before", "after")]
    for name in before["tasks"]:
        rows.append((f"{name} (learned)", f"{chance[name]:.1f}", f"{before['tasks'][name]:.1f}", f"{after['tasks'][name]:.1f}"))
    rows.append(("held-out photos (zero-shot)", f"{chance['heldout']:.1f}", f"{before['heldout']:.1f}", f"{after['heldout']:.1f}"))
    rows.append(("modality gap ‖Δ‖", "", f"{before['gap']['norm']:.3f}", f"{after['gap']['norm']:.3f}"))
    cos = after["gap"].get("cosine")
    rows.append(("gap direction cos(Δ, Δ₀)", "", "1.000", "n/a" if cos is None else f"{cos:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
