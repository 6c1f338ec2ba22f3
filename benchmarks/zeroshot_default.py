"""Zero-shot top-1 of the embedded default `gnsp-mini` on every built-in task and the held-out suite.

Row 0 of every accuracy matrix that gnsp reports starts from these numbers. Label space: each
task's own classes (MTIL convention); prompts: the task's own templates (built-ins and photos: the
8-template ensemble of `zeroshot.TEMPLATES`; held-out emoji and flags: their caption's). The
suite's pooled top-1 and retrieval R@1/R@5 on its held-out pairs follow the table.
Built-ins whose data package is missing are listed as skipped. Prints a markdown table and
writes JSON:  python benchmarks/zeroshot_default.py --out out/zeroshot_default
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gnsp_core.data.builtin import builtin_available
from gnsp_core.data import Task, load_task
from gnsp_core.models.default import REPORT_FILE, build_default_model
from gnsp_core.models import ModelSpec, load_model
from gnsp_core.data.heldout import load_heldout_suite
from gnsp_core.evaluation import heldout_metrics
from gnsp_core.zeroshot import TEMPLATES, build_text_head, evaluate_accuracy

DEFAULT_TASKS = "digits,mnist,animals,textiles,fashion"


def zero_shot_row(loaded, task: Task) -> dict:
    """Top-1 (%) on the task's test split beside chance (100 / number of classes)."""
    start = time.perf_counter()
    test = task.test.with_transform(loaded.preprocess_val)
    head = build_text_head(loaded.model, loaded.tokenizer, task.classnames, task.templates)
    top1 = evaluate_accuracy(loaded.model, test, head)
    return {"task": task.name, "classes": len(task.classnames), "test_images": len(test),
            "top1": round(top1, 2), "chance": round(100.0 / len(task.classnames), 2),
            "seconds": round(time.perf_counter() - start, 1)}


def markdown(rows: list[dict], skipped: list[str]) -> str:
    lines = ["| task | classes | test images | zero-shot top-1 % | chance % |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['classes']} | {r['test_images']} | {r['top1']:.1f} | {r['chance']:.1f} |")
    if skipped:
        lines.append(f"\nskipped (data package missing): {', '.join(skipped)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated task sources")
    parser.add_argument("--max-test-per-class", type=int, default=None, help="cap each task's test split")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and table.md")
    args = parser.parse_args(argv)

    folder = build_default_model(progress=lambda f, m: print(f"build {100 * f:3.0f}% {m}", file=sys.stderr))
    loaded = load_model(ModelSpec(name="gnsp-mini"))
    names = [t for t in args.tasks.split(",") if t]
    skipped = [t for t in names if t in DEFAULT_TASKS.split(",") and not builtin_available(t)]
    tasks = [load_task(t, max_test_per_class=args.max_test_per_class) for t in names if t not in skipped]
    suite = load_heldout_suite()
    rows = [zero_shot_row(loaded, task) for task in tasks + suite.tasks]
    held = heldout_metrics(loaded, suite)
    table = markdown(rows, skipped) + (
        f"\n\nheld-out suite: top-1 {held['heldout_acc']:.1f} % pooled over {sum(r['test_images'] for r in rows[len(tasks):])} "
        f"items; retrieval on {suite.sizes['heldout-pairs']} held-out pairs: R@1 {held['retrieval_r1']:.1f}, "
        f"R@5 {held['retrieval_r5']:.1f} (mean of image->text and text->image)")
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    build_report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
    result = {"model": "gnsp-mini", "templates": TEMPLATES, "label_space": "per task", "rows": rows,
              "heldout": held, "sizes": suite.sizes, "skipped": skipped, "build_report": build_report}
    (args.out / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (args.out / "table.md").write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
