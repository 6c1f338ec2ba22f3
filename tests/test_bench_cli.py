"""`gnsp bench` end to end on the tiny config: results.json per the contract, table and heatmaps."""

from __future__ import annotations

import json

from service.cli.main import main


def test_bench_writes_results_table_and_heatmaps(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", "tiny", "--tasks", "digits,textiles", "--eval", "mnist",
                 "--methods", "finetune,gnsp", "--steps", "3", "--batch-size", "8",
                 "--max-train-per-class", "3", "--max-test-per-class", "2",
                 "--reference", "tests.conftest:reference_pairs", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "tiny" and results["tasks"] == ["digits", "textiles"] and results["eval"] == ["mnist"]
    for method in ("finetune", "gnsp"):
        r = results["methods"][method]
        assert len(r["acc"]) == 3 and all(len(row) == 3 for row in r["acc"])
        assert all(0 <= v <= 100 for row in r["acc"] for v in row)
        assert len(r["modality_gap"]) == 3 and r["step_ms"] > 0 and r["train_s"] > 0
        assert r["last"] == sum(r["acc"][-1]) / 3
        assert (out / f"heatmap_{method}.png").stat().st_size > 1000
    assert "| gnsp |" in (out / "results.md").read_text()
    assert "Transfer" in capsys.readouterr().out


def test_bench_rejects_an_unknown_method(tmp_path, capsys):
    code = main(["bench", "--model", "tiny", "--tasks", "digits", "--methods", "nope", "--out", str(tmp_path)])
    assert code == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
