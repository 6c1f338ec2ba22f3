"""Eigendecompositions of the running input covariances, computed once and shared by every worker.

The null space of a protected map is read off the eigenvectors of its running covariance. An
eigendecomposition of a 3072 × 3072 matrix (a ViT-B/16 `c_proj` input) is the most expensive step
of GNSP outside training, so it runs once per task: on rank 0, on the device the model lives on
(the GPU when there is one), and is broadcast to the other DDP ranks with `torch.distributed`,
which also guarantees that every rank projects with the same basis.

A `Spectrum` may be truncated: the compact `eigen` storage keeps only the leading eigenvectors
that hold a stated fraction of the energy, and remembers the energy it dropped (`residual`), so
the energy rule still measures tails against the true total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Spectrum:
    """Eigenvalues (descending, ≥ 0) and eigenvectors of one covariance, possibly truncated."""

    values: torch.Tensor
    """[k] float64, descending."""
    vectors: torch.Tensor
    """[d, k]: column i belongs to values[i]."""
    residual: float = 0.0
    """Sum of the eigenvalues of the d − k eigenvectors not kept (0 for a complete spectrum)."""

    @property
    def dim(self) -> int:
        return self.vectors.shape[0]

    @property
    def complete(self) -> bool:
        return self.vectors.shape[1] == self.vectors.shape[0]

    def total(self) -> float:
        return float(self.values.sum()) + self.residual

    def matrix(self) -> torch.Tensor:
        """The covariance the spectrum stands for (float64; the dropped tail reads as zero)."""
        vectors = self.vectors.double()
        return (vectors * self.values.double()) @ vectors.T

    def truncated(self, energy: float) -> "Spectrum":
        """The fewest leading eigenvectors whose eigenvalues hold at least `energy` of the total."""
        if energy >= 1.0 or not self.complete:
            return self
        held = self.values.cumsum(0)
        keep = int((held < energy * self.total()).sum()) + 1
        keep = min(keep, len(self.values))
        residual = float(self.values[keep:].sum())
        return Spectrum(self.values[:keep].clone(), self.vectors[:, :keep].clone(), residual)


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(matrix.double())
    return values.flip(0).clamp_min(0), vectors.flip(1)


def _process_group_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def eigendecompose(covariance: torch.Tensor, device: torch.device | str | None = None,
                   broadcast: bool = True) -> Spectrum:
    """The complete spectrum of a symmetric matrix, computed on `device` (default: the matrix's).

    With `broadcast` and an initialised `torch.distributed` group of more than one process, only
    rank 0 computes; the others receive its result (every rank must call this collectively, in the
    same order). Returned on the CPU.
    """
    device = torch.device(device) if device is not None else covariance.device
    if not broadcast or _process_group_size() == 1:
        values, vectors = _eigh(covariance.to(device))
        return Spectrum(values.cpu(), vectors.cpu())
    dist = torch.distributed
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    d = covariance.shape[0]
    if dist.get_rank() == 0:
        values, vectors = _eigh(covariance.to(device))
        values, vectors = values.contiguous(), vectors.contiguous()
    else:
        values = torch.empty(d, dtype=torch.float64, device=device)
        vectors = torch.empty(d, d, dtype=torch.float64, device=device)
    dist.broadcast(values, src=0)
    dist.broadcast(vectors, src=0)
    return Spectrum(values.cpu(), vectors.cpu())
