"""Projector statistics on disk: compact forms, their measured effect, content addresses, old states."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from gnsp_core.projection import ProjectorStatistics, split_spectrum
from gnsp_core.spectra import eigendecompose
from gnsp_core.state import ContinualState
from gnsp_core.stats_storage import STATS_DIR, read_statistics, write_statistics


def decaying_covariance(d: int, seed: int) -> torch.Tensor:
    """A unit-norm covariance with a geometric spectrum, like a layer's inputs (a few strong directions)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    cov = (q * 0.8 ** torch.arange(d, dtype=torch.float64)) @ q.T
    return cov / cov.norm()


def stats_of(storage: str, energy: float = 1.0, tasks: int = 2, d: int = 24) -> ProjectorStatistics:
    stats = ProjectorStatistics(storage=storage, storage_energy=energy)
    for t in range(tasks):
        stats.add_task({"a": decaying_covariance(d, t), "b": decaying_covariance(d // 2, 10 + t)})
    return stats


def null_projector(stats: ProjectorStatistics, name: str, threshold: float = 0.15) -> torch.Tensor:
    range_basis, _ = split_spectrum(stats.spectrum(name), "energy", threshold)
    return torch.eye(range_basis.shape[0], dtype=torch.float64) - range_basis @ range_basis.T


def file_bytes(folder) -> int:
    return sum(p.stat().st_size for p in (folder / STATS_DIR).iterdir())


@pytest.mark.parametrize("storage,energy", [("float64", 1.0), ("float32", 1.0), ("eigen", 0.9999)])
def test_saved_statistics_load_exactly_as_held_in_memory(storage, energy, tmp_path):
    stats = stats_of(storage, energy)
    files = write_statistics(stats, tmp_path)
    again = read_statistics(tmp_path, files, stats.num_tasks, storage, energy)
    for name in ("a", "b"):
        assert torch.equal(again.covariances[name], stats.covariances[name])
        assert torch.equal(null_projector(again, name), null_projector(stats, name))


def test_float32_keeps_a_quarter_and_stays_within_float32_rounding(tmp_path):
    exact, compact = stats_of("float64", d=64), stats_of("float32", d=64)
    write_statistics(exact, tmp_path / "f64")
    write_statistics(compact, tmp_path / "f32")
    assert file_bytes(tmp_path / "f32") < 0.3 * file_bytes(tmp_path / "f64")
    for name in ("a", "b"):
        err = (compact.covariances[name] - exact.covariances[name]).norm() / exact.covariances[name].norm()
        assert 0 < err < 1e-7
        assert (null_projector(compact, name) - null_projector(exact, name)).norm() < 1e-5


def test_eigen_storage_states_the_energy_it_keeps_and_drops_only_into_the_null_space(tmp_path):
    exact, compact = stats_of("float64", d=64), stats_of("eigen", 0.999, d=64)
    spectrum = compact.spectra["a"]
    assert not spectrum.complete and spectrum.vectors.shape[1] < 64
    assert spectrum.residual / spectrum.total() <= 1 - 0.999
    files = write_statistics(compact, tmp_path)
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / files["a"]), "pt").metadata()["gnsp"])
    assert meta["energy"] == 0.999 and meta["residual"] == pytest.approx(spectrum.residual)
    # The range the energy rule protects is (almost) the float64 one: the dropped eigenvectors hold
    # less energy than ρ and belong to the null space either way.
    p64, pe = null_projector(exact, "a"), null_projector(compact, "a")
    assert torch.trace(p64) == pytest.approx(torch.trace(pe), abs=1)
    assert (p64 - pe).norm(2) < 0.2


def test_file_names_are_content_addresses(tmp_path):
    stats = stats_of("float32")
    first = write_statistics(stats, tmp_path / "one")
    second = write_statistics(stats_of("float32"), tmp_path / "two")
    assert first == second, "equal statistics give equal names, so a store keeps them once"
    stats.add_task({"a": decaying_covariance(24, 5), "b": torch.zeros(12, 12, dtype=torch.float64)})
    third = write_statistics(stats, tmp_path / "three")
    assert third["a"] != first["a"], "a changed"
    assert third["b"] == first["b"], "b did not change (zero added): its file is shared with the parent"
    assert len(set(first.values())) == 2


def test_a_state_of_the_first_format_still_loads(tiny, tmp_path):
    """Format 1: float64 matrices `cov.<map>` inside extras.safetensors."""
    cov = decaying_covariance(8, 0)
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(folder / "weights.safetensors"))
    save_file({"cov.visual.proj": cov, "mgclip.head": torch.ones(2)}, str(folder / "extras.safetensors"))
    (folder / "state.json").write_text(json.dumps({"format": 1, "spec": tiny.spec.to_dict(), "num_stat_tasks": 3,
                                                   "history": [], "config": {}}))
    state = ContinualState.load(folder)
    assert torch.equal(state.stats.covariances["visual.proj"], cov) and state.stats.num_tasks == 3
    assert state.stats.storage == "float64" and list(state.extras) == ["mgclip.head"]
    state.save(tmp_path / "new")  # written in the current format, with the same statistics
    again = ContinualState.load(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "state.json").read_text())["format"] == 2
    assert torch.equal(again.stats.covariances["visual.proj"], cov)


def test_eigendecomposition_runs_once_per_task(monkeypatch):
    """`eigen` storage decomposes when a task is added; the projector then reuses that spectrum."""
    import gnsp_core.projection as projection

    calls = []
    monkeypatch.setattr(projection, "eigendecompose", lambda *a, **k: calls.append(1) or eigendecompose(*a, **k))
    stats = stats_of("eigen", 0.9999, tasks=1)
    assert len(calls) == 2  # one per map
    stats.spectrum("a"), stats.spectrum("b")
    assert len(calls) == 2
    float32 = stats_of("float32", tasks=1)
    float32.spectrum("a"), float32.spectrum("a")
    assert len(calls) == 3
