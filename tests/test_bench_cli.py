"""`gnsp bench` end to end on the tiny config: results.json per the contract, table and heatmaps."""

from __future__ import annotations

import json

import pytest

from gnsp_core.bench_stats import t_interval

from service.cli.main import main


def test_bench_writes_results_table_and_heatmaps(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", "tiny", "--tasks", "digits,textiles", "--eval", "mnist",
                 "--methods", "finetune,gnsp", "--steps", "3", "--batch-size", "8", "--seeds", "2", "--seed", "5",
                 "--max-train-per-class", "3", "--max-test-per-class", "2",
                 "--reference", "tests.conftest:reference_pairs", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "tiny" and results["tasks"] == ["digits", "textiles"] and results["eval"] == ["mnist"]
    assert results["seeds"] == 2
    for method in ("finetune", "gnsp"):
        r = results["methods"][method]
        assert [run["config"]["seed"] for run in r["runs"]] == [5, 6] == r["seeds"]
        for run in r["runs"]:  # every seed's own run, in the single-run shape
            assert len(run["acc"]) == 3 and all(len(row) == 3 for row in run["acc"])
            assert all(0 <= v <= 100 for row in run["acc"] for v in row)
            assert len(run["modality_gap"]) == 3 and run["step_ms"] > 0 and run["train_s"] > 0
            assert run["last"] == pytest.approx(sum(run["acc"][-1]) / 3)
        for key in ("transfer", "avg", "last", "bwt", "plasticity", "heldout:mnist"):
            assert r["ci"][key] == pytest.approx(t_interval([run_value(run, key) for run in r["runs"]]))
        assert r["avg"] == r["ci"]["avg"]["mean"]
        assert r["acc"][2][2] == pytest.approx((r["runs"][0]["acc"][2][2] + r["runs"][1]["acc"][2][2]) / 2)
        assert (out / f"heatmap_{method}.png").stat().st_size > 1000
    markdown = (out / "results.md").read_text()
    assert "| gnsp |" in markdown and "±" in markdown and "2 seeds" in markdown
    printed = capsys.readouterr().out
    assert "Transfer" in printed and "heldout mnist" in printed


def run_value(run: dict, key: str) -> float:
    return run["acc"][-1][-1] if key == "heldout:mnist" else run[key]


def test_bench_refuses_zero_seeds(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--model", "tiny", "--tasks", "digits", "--seeds", "0", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "not a whole number of seeds >= 1" in capsys.readouterr().err


def test_bench_rejects_an_unknown_method(tmp_path, capsys):
    code = main(["bench", "--model", "tiny", "--tasks", "digits", "--methods", "nope", "--out", str(tmp_path)])
    assert code == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
