"""benchmarks/gpu_check.py: refuses clearly without a GPU; its CPU smoke mode runs every check."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module importable by name (its DDP workers are spawned processes that import it)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("gpu_check")


def test_without_a_gpu_it_says_so_and_exits_non_zero(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--cpu-smoke" in err
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_cpu_smoke_runs_step_times_and_the_two_worker_check(gpu_check, tmp_path):
    assert gpu_check.main(["--cpu-smoke", "--skip-serve", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(r["method"], r["precision"]) for r in result["step_times"]] == [
        ("finetune", "fp32"), ("finetune", "bf16 autocast"), ("gnsp", "fp32"), ("gnsp", "bf16 autocast")]
    assert all(r["median_step_ms"] > 0 for r in result["step_times"])
    ddp = result["ddp_statistics"]
    assert ddp["backend"] == "gloo" and ddp["equal"] and ddp["maps"] == 5
    assert ddp["pass_max_abs_diff_vs_one_process"] < 1e-5
