"""A continual state saves and loads exactly, and a crash mid-save never corrupts the old one."""

from __future__ import annotations

import pytest
import torch

from gnsp_core.errors import StateError
from gnsp_core.projection import ProjectorStatistics
from gnsp_core.state import ContinualState, TaskRecord


def make_state(tiny) -> ContinualState:
    state = ContinualState.initial(tiny.model, tiny.spec)
    g = torch.Generator().manual_seed(0)
    state.stats = ProjectorStatistics({"visual.proj": torch.randn(64, 64, generator=g, dtype=torch.float64)}, 1)
    state.extras = {"mgclip.comp.A": torch.randn(2, 64, generator=g)}
    state.history = [TaskRecord("A", ["red", "green"], "gnsp", 12, {"acc": 97.5})]
    state.config = {"method": "gnsp", "projection": {"threshold": 0.15}}
    return state


def test_round_trip_is_exact(tiny, tmp_path):
    state = make_state(tiny)
    state.save(tmp_path / "v1")
    again = ContinualState.load(tmp_path / "v1")
    assert again.spec == state.spec and again.history == state.history and again.config == state.config
    assert again.weights.keys() == state.weights.keys()
    assert all(torch.equal(again.weights[k], state.weights[k]) for k in state.weights)
    cov = again.stats.covariances["visual.proj"]
    assert cov.dtype == torch.float64 and torch.equal(cov, state.stats.covariances["visual.proj"])
    assert torch.equal(again.extras["mgclip.comp.A"], state.extras["mgclip.comp.A"])
    tiny.model.load_state_dict(again.weights)


def test_overwrite_is_atomic_when_the_write_fails(tiny, tmp_path, monkeypatch):
    state = make_state(tiny)
    state.save(tmp_path / "v1")
    import gnsp_core.state as module

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", broken_save)
    changed = make_state(tiny)
    changed.history = []
    with pytest.raises(OSError):
        changed.save(tmp_path / "v1")
    assert ContinualState.load(tmp_path / "v1").history == state.history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"], "no temporary folder is left behind"


def test_missing_files_are_a_clear_error(tmp_path):
    (tmp_path / "broken").mkdir()
    with pytest.raises(StateError, match="missing"):
        ContinualState.load(tmp_path / "broken")
