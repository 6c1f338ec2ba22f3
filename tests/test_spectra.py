"""Eigendecompositions: truncation keeps the stated energy; DDP ranks receive rank 0's result."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gnsp_core.projection import NullSpaceProjector, ProjectionConfig, ProjectorStatistics
from gnsp_core.spectra import Spectrum, eigendecompose


def test_truncation_keeps_the_fewest_vectors_holding_the_energy():
    values = torch.tensor([6.0, 3.0, 0.9, 0.1], dtype=torch.float64)
    full = Spectrum(values, torch.eye(4, dtype=torch.float64))
    kept = full.truncated(0.95)  # 6 + 3 = 9 < 9.5 ≤ 9.9
    assert kept.vectors.shape == (4, 3) and kept.residual == 0.1 and kept.total() == 10.0
    assert full.truncated(0.9).vectors.shape[1] == 2  # 9 ≥ 9
    assert torch.allclose(kept.matrix(), torch.diag(torch.tensor([6.0, 3.0, 0.9, 0.0], dtype=torch.float64)))


def test_eigendecompose_is_descending_and_reconstructs():
    x = torch.randn(30, 10, dtype=torch.float64)
    spectrum = eigendecompose(x.T @ x)
    assert spectrum.complete and bool((spectrum.values[:-1] >= spectrum.values[1:]).all())
    assert torch.allclose(spectrum.matrix(), x.T @ x, atol=1e-10)


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Each rank holds different matrices: only rank 0's are decomposed, the others receive them.
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(40, 12, generator=g, dtype=torch.float64)
        stats = ProjectorStatistics(storage="eigen", storage_energy=0.999)
        stats.add_task({"fc": x.T @ x})
        layer = torch.nn.Sequential(torch.nn.Linear(12, 3, bias=False)).double()  # map "0"
        from gnsp_core.linear_maps import LinearMapSet

        f32 = ProjectorStatistics(storage="float32")
        f32.add_task({"0": x.T @ x})
        projector = NullSpaceProjector(LinearMapSet(layer, "all"), f32, ProjectionConfig(scope="all"))
        torch.save({"eigen": stats.spectra["fc"], "basis": projector.layers[0].basis}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_rank_zeros_decomposition(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"out.{r}", weights_only=False) for r in (0, 1))
    assert torch.equal(zero["eigen"].vectors, one["eigen"].vectors)
    assert torch.equal(zero["eigen"].values, one["eigen"].values)
    assert torch.equal(zero["basis"], one["basis"])
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(zero["eigen"].values, eigendecompose(x.T @ x).values[: len(zero["eigen"].values)])
