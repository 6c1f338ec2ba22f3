"""Gradient null space projection (GNSP), step by step as in the method section:

1. collect: after a task, one pass over its training data records, for every protected linear
   map, the uncentered covariance XᵀX of the map's inputs (`CovarianceCollector`);
2. accumulate: each task's matrix is normalised and added to the running sum over tasks
   (`ProjectorStatistics`), which is saved with the weights because version N+1 needs it;
3. eigendecompose the running matrix and choose the null space by a threshold rule
   (`null_space_basis`);
4. project: restrict the raw gradient (paper) or the optimiser's whole step (exact with AdamW)
   to that null space (`NullSpaceProjector`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch

from gnsp_core.errors import ConfigError
from gnsp_core.linear_maps import LinearMap, LinearMapSet

Rule = Literal["energy", "cutoff"]
AllReduce = Callable[[torch.Tensor], torch.Tensor]
_EIG_FLOOR = 1e-10  # numerically zero eigenvalues are floored at this fraction of λ_max


@dataclass(frozen=True)
class ProjectionConfig:
    """How GNSP protects old tasks; every field is a flag and a Tune-able value."""

    scope: str = "vision_mlp"
    """Which linear maps: `vision_mlp` (paper: vision MLPs + visual projection), `all`, or a regex."""
    target: Literal["gradient", "update"] = "gradient"
    """Project the raw gradient (paper) or the optimiser's final update (exact with AdamW)."""
    rule: Rule = "energy"
    """`energy`: null space = largest eigen-tail holding < threshold of the energy (paper, ρ = 0.15).
    `cutoff`: eigenvalues ≤ threshold · λ_min (Adam-NSCL)."""
    threshold: float = 0.15
    stat_norm: Literal["batch", "task"] = "batch"
    """`batch`: each batch's XᵀX is divided by its Frobenius norm before summing (paper);
    `task`: only the task total is normalised (independent of batching, so N workers = 1 process)."""
    seed_with_reference: bool = False
    """Before the first task, add the reference data's statistics so pre-trained knowledge is protected too."""


class CovarianceCollector:
    """Accumulates XᵀX (float64) per linear map while a model runs over one task's data."""

    def __init__(self, maps: LinearMapSet, stat_norm: str = "batch") -> None:
        self.maps, self.stat_norm = maps, stat_norm
        self.sums: dict[str, torch.Tensor] = {}
        self._batch: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        """Input rows each map received (a map with none was never reached by the pass)."""

    def _sink(self, name: str, x: torch.Tensor) -> None:
        self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        x = x.double()
        gram = x.T @ x
        self._batch[name] = self._batch[name] + gram if name in self._batch else gram

    @torch.no_grad()
    def add_batch(self, forward: Callable[[], object]) -> None:
        """Run `forward()` (one batch through the model) and add its inputs' statistics."""
        with self.maps.tap_inputs(self._sink):
            forward()
        for name, gram in self._batch.items():
            if self.stat_norm == "batch":
                gram = gram / gram.norm().clamp_min(1e-30)
            self.sums[name] = self.sums[name] + gram if name in self.sums else gram
        self._batch.clear()

    def task_matrices(self, all_reduce: AllReduce | None = None) -> dict[str, torch.Tensor]:
        """The task's covariance per map, summed across workers, normalised to unit Frobenius norm.

        A map that received no input on any worker is an error (its statistics would be zero and
        its null space empty: it would silently never train again); every worker raises alike.
        """
        self._check_reached(all_reduce)
        out = {}
        for m in self.maps:
            total = self.sums.get(m.name)
            if total is None:
                total = torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
            if all_reduce is not None:
                total = all_reduce(total)
            out[m.name] = total / total.norm().clamp_min(1e-30)
        return out

    def _check_reached(self, all_reduce: AllReduce | None) -> None:
        rows = torch.tensor([float(self.rows.get(m.name, 0)) for m in self.maps], dtype=torch.float64,
                            device=self.maps.maps[0].weight.device)
        if all_reduce is not None:
            rows = all_reduce(rows)
        missing = [m.name for m, n in zip(self.maps, rows.tolist()) if n == 0]
        if missing:
            raise ConfigError(f"the statistics pass never reached the protected linear map(s) {missing}: "
                              "no input of this task flows through them (or the model computes them "
                              "outside the module GNSP taps); choose a projection scope without them")


class ProjectorStatistics:
    """The running covariance per protected map, summed over every task learned so far."""

    def __init__(self, covariances: dict[str, torch.Tensor] | None = None, num_tasks: int = 0) -> None:
        self.covariances = dict(covariances or {})
        self.num_tasks = num_tasks

    def add_task(self, task_matrices: dict[str, torch.Tensor]) -> None:
        for name, mat in task_matrices.items():
            mat = mat.detach().to("cpu", torch.float64)
            self.covariances[name] = self.covariances[name] + mat if name in self.covariances else mat
        self.num_tasks += 1

    def is_empty(self) -> bool:
        return not self.covariances

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"cov.{k}": v.contiguous() for k, v in self.covariances.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], num_tasks: int) -> "ProjectorStatistics":
        covs = {k[len("cov."):]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("cov.")}
        return cls(covs, num_tasks)


def null_space_basis(covariance: torch.Tensor, rule: Rule, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the eigenvectors of a covariance into (V₁ range, V₂ null space), by `rule`."""
    eigvals, eigvecs = torch.linalg.eigh(covariance.double())
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)  # descending
    if rule == "energy":
        tail = eigvals.flip(0).cumsum(0).flip(0)  # tail[k] = Σ_{i ≥ k} λ_i
        inside = (tail < threshold * eigvals.sum()).nonzero()
        split = int(inside[0]) if len(inside) else len(eigvals)
    elif rule == "cutoff":
        lam_min = eigvals[-1].clamp_min(_EIG_FLOOR * eigvals[0])
        split = int((eigvals > threshold * lam_min).sum())
    else:
        raise ValueError(f"unknown null-space rule {rule!r}; use 'energy' or 'cutoff'")
    return eigvecs[:, :split], eigvecs[:, split:]


class _MapProjector:
    """Projects one map's matrices onto its null space with the cheaper factorisation.

    Keeping k columns costs O(k) per projection: with V₂ (k₂ columns) it is V₂V₂ᵀ; with V₁ it is
    I − V₁V₁ᵀ. Whichever basis is smaller is stored.
    """

    def __init__(self, linear_map: LinearMap, range_basis: torch.Tensor, null_basis: torch.Tensor) -> None:
        self.map = linear_map
        device, dtype = linear_map.weight.device, linear_map.weight.dtype
        self.use_null = null_basis.shape[1] <= range_basis.shape[1]
        basis = null_basis if self.use_null else range_basis
        self.basis = basis.to(device, dtype)
        self.null_dim = null_basis.shape[1]

    def __call__(self, mat: torch.Tensor) -> torch.Tensor:
        v = self.basis.to(mat.dtype)
        if self.map.side == "right":  # W is [out, in]; rows act on inputs: M V Vᵀ
            inner = (mat @ v) @ v.T
        else:  # W is [in, out]; columns act on inputs: V Vᵀ M
            inner = v @ (v.T @ mat)
        return inner if self.use_null else mat - inner


class NullSpaceProjector:
    """Restricts updates of the protected maps to the null space of old tasks' inputs."""

    def __init__(self, maps: LinearMapSet, stats: ProjectorStatistics, config: ProjectionConfig) -> None:
        self.maps, self.config = maps, config
        self.layers: list[_MapProjector] = []
        for m in maps:
            cov = stats.covariances.get(m.name)
            if cov is None:
                raise KeyError(f"no statistics for {m.name}; were they collected with the same scope?")
            range_basis, null_basis = null_space_basis(cov, config.rule, config.threshold)
            self.layers.append(_MapProjector(m, range_basis, null_basis))
        self._before: list[torch.Tensor] = []

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Paper: g ← g P (or P g for x W maps) before the optimiser sees it."""
        for p in self.layers:
            grad = p.map.weight.grad
            if grad is not None:
                grad.copy_(p(grad))

    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember the weights before an optimiser step (for update projection)."""
        self._before = [p.map.weight.detach().clone() for p in self.layers]

    @torch.no_grad()
    def project_updates(self) -> None:
        """Adam-NSCL: W ← W₀ + P(W − W₀), so the whole step, weight decay included, is in the null space."""
        for p, before in zip(self.layers, self._before):
            weight = p.map.weight
            weight.copy_(before + p(weight - before))
        self._before = []


def collect_statistics(
    maps: LinearMapSet,
    batches: Iterable,
    forward: Callable[[object], object],
    stat_norm: str = "batch",
    all_reduce: AllReduce | None = None,
) -> dict[str, torch.Tensor]:
    """One pass over a task's data: the task's normalised input covariance per protected map."""
    collector = CovarianceCollector(maps, stat_norm)
    for batch in batches:
        collector.add_batch(lambda: forward(batch))
    return collector.task_matrices(all_reduce)
