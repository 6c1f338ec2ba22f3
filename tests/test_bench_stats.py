"""Mean ± 95 % t-intervals over seeds: the numbers `gnsp bench --seeds N` prints and stores."""

from __future__ import annotations

import math

import pytest

from gnsp_core.bench_stats import aggregate_runs, format_interval, run_scalars, separated, t_interval
from gnsp_core.report import heldout_table, matrix_table, separation_notes, summary_table


def test_t_interval_matches_the_textbook_value():
    # mean 2, s = 1, n = 3: half-width t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051
    s = t_interval([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["n"] == 3 and s["std"] == pytest.approx(1.0)
    assert s["half_width"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert s["low"] == pytest.approx(2.0 - s["half_width"]) and s["high"] == pytest.approx(2.0 + s["half_width"])


def test_one_seed_has_a_mean_but_no_interval():
    s = t_interval([5.0, None])
    assert s["mean"] == 5.0 and s["half_width"] is None and s["n"] == 1
    assert format_interval(s) == "5.0"
    assert format_interval(t_interval([])) == "n/a"
    assert format_interval(t_interval([1.0, 3.0])) == "2.0 ± 12.7"  # s = √2, t_{0.975, 1} = 12.706


def test_separated_only_when_intervals_do_not_overlap():
    assert separated(t_interval([10, 11, 12]), t_interval([1, 2, 3]))
    assert not separated(t_interval([1, 5, 9]), t_interval([2, 3, 4]))
    assert not separated(t_interval([1.0]), t_interval([9.0]))  # no interval, no claim


def _run(seed: int, acc: list[list[float]], retrieval=None) -> dict:
    run = {"acc": acc, "transfer": acc[1][1], "avg": 50.0 + seed, "last": 40.0 + seed, "bwt": -float(seed),
           "fwt": 0.0, "plasticity": 70.0, "train_s": 1.0, "step_ms": 10.0, "modality_gap": [0.5, 0.4 + seed],
           "modality_gap_cosine": [1.0, None if seed else 0.9], "config": {"seed": seed}}
    if retrieval is not None:
        run["retrieval"] = retrieval
        run["heldout_acc"] = [50.0, 55.0, 60.0 + seed]
    return run


def test_aggregate_keeps_the_single_run_shape_with_means_and_intervals():
    runs = [_run(0, [[10, 20, 30], [80, 25, 35], [60, 90, 31]], [{"i2t_R@1": 5.0}, {"i2t_R@1": 6.0}, {"i2t_R@1": 7.0}]),
            _run(1, [[10, 20, 30], [90, 35, 37], [70, 80, 29]], [{"i2t_R@1": 5.0}, {"i2t_R@1": 8.0}, {"i2t_R@1": 9.0}])]
    agg = aggregate_runs(runs, ["a", "b"], ["photos"])
    assert agg["acc"][1] == [85.0, 30.0, 36.0] and agg["acc_ci"][0] == [0.0, 0.0, 0.0]
    assert agg["acc_ci"][2][0] == pytest.approx(t_interval([60, 70])["half_width"])
    assert agg["avg"] == 50.5 and agg["ci"]["bwt"]["mean"] == -0.5 and agg["seeds"] == [0, 1]
    assert agg["ci"]["heldout:photos"]["mean"] == 30.0  # the final row's held-out column
    assert agg["ci"]["retrieval:i2t_R@1"]["mean"] == 8.0  # the last row of each run
    assert agg["retrieval"] == [{"i2t_R@1": 5.0}, {"i2t_R@1": 7.0}, {"i2t_R@1": 8.0}]  # per row, like one run
    assert agg["heldout_acc"] == [50.0, 55.0, 60.5] and agg["ci"]["heldout_acc"]["mean"] == 60.5
    assert agg["modality_gap"] == pytest.approx([0.5, 0.9]) and agg["modality_gap_cosine"] == [1.0, None]


def test_tables_print_mean_and_interval():
    runs = [_run(s, [[10, 20, 30], [80 + s, 25, 35], [60 + 2 * s, 90, 31 + s]]) for s in range(3)]
    fine = [_run(s, [[10, 20, 30], [85, 25, 35], [20 + s, 90, 31]]) | {"avg": 30.0 + s} for s in range(3)]
    results = {"model": "tiny", "tasks": ["a", "b"], "eval": ["photos"], "seeds": 3,
               "methods": {"finetune": aggregate_runs(fine, ["a", "b"], ["photos"]),
                           "gnsp": aggregate_runs(runs, ["a", "b"], ["photos"])}}
    summary = summary_table(results)
    assert "| gnsp | 25.0 ± 0.0 | 51.0 ± 2.5 | 41.0 ± 2.5 | -1.0 ± 2.5 | 70.0 ± 0.0 |" in summary and "3 seeds" in summary
    assert "| gnsp | 32.0 ± 2.5 |" in heldout_table(results)
    assert "| b | 62.0 ± 5.0 |" in matrix_table(results, "gnsp")
    assert separation_notes(results) == ["- gnsp vs finetune: intervals separate on Avg"]


def test_run_scalars_without_evals_or_retrieval():
    assert run_scalars(_run(0, [[1, 2], [3, 4]]), ["a", "b"], []) == {
        "transfer": 4, "avg": 50.0, "last": 40.0, "bwt": -0.0, "fwt": 0.0, "plasticity": 70.0,
        "train_s": 1.0, "step_ms": 10.0}
