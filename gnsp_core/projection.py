"""Gradient null space projection (GNSP), step by step as in the method section:

1. collect: after a task, one pass over its training data records, for every protected linear
   map, the uncentered covariance XᵀX of the map's inputs (`CovarianceCollector`);
2. accumulate: each task's matrix is normalised and added to the running sum over tasks
   (`ProjectorStatistics`; the paper first rescales the old `visual.proj` sum to unit norm),
   which is saved with the weights because version N+1 needs it (`stats_storage`);
3. eigendecompose the running matrix once (`spectra`) and choose the null space by a threshold
   rule (`split_spectrum`);
4. project: restrict the raw gradient (paper) or the optimiser's whole step (exact with AdamW)
   to that null space (`NullSpaceProjector`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch

from gnsp_core.errors import ConfigError
from gnsp_core.linear_maps import LinearMap, LinearMapSet
from gnsp_core.spectra import Spectrum, eigendecompose

Rule = Literal["energy", "cutoff"]
Storage = Literal["float32", "eigen", "float64"]
STORAGES = ("auto", "float32", "eigen", "float64")
AllReduce = Callable[[torch.Tensor], torch.Tensor]
_EIG_FLOOR = 1e-10  # numerically zero eigenvalues are floored at this fraction of λ_max
PAPER_RENORMALISED = r"^visual\.proj$"


@dataclass(frozen=True)
class ProjectionConfig:
    """How GNSP protects old tasks; every field is a flag and a Tune-able value."""

    scope: str = "vision_mlp"
    """Which linear maps: `vision_mlp` (paper: vision MLPs + visual projection), `all`, or a regex."""
    target: Literal["gradient", "update"] = "gradient"
    """Project the raw gradient (paper) or the optimiser's final update (exact with AdamW)."""
    rule: Rule = "energy"
    """`energy`: null space = largest eigen-tail holding < threshold of the energy (paper, ρ = 0.15;
    0 < ρ < 1). `cutoff`: eigenvalues ≤ threshold · λ_min (Adam-NSCL; threshold ≥ 1)."""
    threshold: float = 0.15
    stat_norm: Literal["batch", "task"] = "batch"
    """`batch`: each batch's XᵀX is divided by its Frobenius norm before summing (paper);
    `task`: only the task total is normalised (independent of batching, so N workers = 1 process)."""
    seed_with_reference: bool = False
    """Before the first task, add the reference data's statistics so pre-trained knowledge is protected too."""
    renormalise_old: str = PAPER_RENORMALISED
    """Regex of maps whose running statistics are scaled to unit Frobenius norm before a new task's
    are added (paper: `visual.proj`, so the old tasks together weigh as much as the new one); the
    other maps add as-is. Empty: every map is a plain sum."""
    storage: Literal["auto", "float32", "eigen", "float64"] = "auto"
    """How a saved state keeps the running statistics: `float32` (the symmetric matrix's upper
    triangle in float32, a quarter of float64), `eigen` (the leading eigenvectors holding
    `storage_energy` of each map's energy, float32; energy rule only), `float64` (lossless, the
    cut-off rule's exactness needs it: float32 rounding lifts zero eigenvalues to ~1e-7·λ_max);
    `auto`: float32 with the energy rule, float64 with the cut-off rule."""
    storage_energy: float = 0.9999
    """`eigen` storage: fraction of each map's energy kept (the rest is dropped into the null space)."""

    def __post_init__(self) -> None:
        validate_projection(self)

    @property
    def stored_as(self) -> Storage:
        """The storage form `auto` stands for under this rule."""
        if self.storage != "auto":
            return self.storage
        return "float64" if self.rule == "cutoff" else "float32"


def validate_projection(cfg: ProjectionConfig) -> None:
    """Refuse thresholds and storage settings that have no meaning under the chosen rule."""
    if cfg.rule not in ("energy", "cutoff"):
        raise ConfigError(f"projection.rule must be 'energy' or 'cutoff', not {cfg.rule!r}")
    if cfg.storage not in STORAGES:
        raise ConfigError(f"projection.storage must be one of {', '.join(STORAGES)}, not {cfg.storage!r}")
    finite = isinstance(cfg.threshold, (int, float)) and math.isfinite(cfg.threshold)
    if cfg.rule == "energy" and not (finite and 0 < cfg.threshold < 1):
        raise ConfigError(f"projection.threshold {cfg.threshold!r} is out of range for the energy rule: "
                          "it is the fraction ρ of energy in the null space, 0 < ρ < 1 (paper: 0.15)")
    if cfg.rule == "cutoff" and not (finite and cfg.threshold >= 1):
        raise ConfigError(f"projection.threshold {cfg.threshold!r} is out of range for the cut-off rule: "
                          "the null space holds eigenvalues ≤ a·λ_min, so a ≥ 1 (e.g. 10)")
    if not 0 < cfg.storage_energy <= 1:
        raise ConfigError(f"projection.storage_energy must be in (0, 1], not {cfg.storage_energy!r}")
    if cfg.storage == "eigen" and cfg.rule == "cutoff":
        raise ConfigError("projection.storage 'eigen' drops the smallest eigenvalues the cut-off rule "
                          "measures against; use storage 'float32' or 'float64' with rule 'cutoff'")
    if cfg.storage == "eigen" and 1 - cfg.storage_energy >= cfg.threshold:
        raise ConfigError(f"projection.storage_energy {cfg.storage_energy} drops {1 - cfg.storage_energy:.3g} "
                          f"of the energy, not less than ρ = {cfg.threshold}: keep more (e.g. 0.9999)")
    try:
        re.compile(cfg.renormalise_old)
    except re.error as exc:
        raise ConfigError(f"projection.renormalise_old is not a regex: {exc}") from exc


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
    """The running covariance per protected map, summed over every task learned so far.

    `storage` is the form a saved state keeps (see `ProjectionConfig.storage`). It is applied as
    each task is added, so the statistics in memory always equal what a save and load would give:
    a run of several tasks in one process protects exactly as a run resumed from saved versions.
    """

    def __init__(self, covariances: dict[str, torch.Tensor] | None = None, num_tasks: int = 0,
                 storage: Storage = "float64", storage_energy: float = 1.0,
                 spectra: dict[str, Spectrum] | None = None) -> None:
        self.covariances = dict(covariances or {})
        self.num_tasks = num_tasks
        self.storage, self.storage_energy = storage, storage_energy
        self.spectra: dict[str, Spectrum] = dict(spectra or {})
        """Eigendecompositions already known (computed this task, or read from `eigen` storage)."""

    def copy(self, storage: Storage | None = None, storage_energy: float | None = None) -> "ProjectorStatistics":
        """A copy to accumulate into (the matrices are shared until a task replaces them)."""
        return ProjectorStatistics(self.covariances, self.num_tasks, storage or self.storage,
                                   self.storage_energy if storage_energy is None else storage_energy, self.spectra)

    def add_task(self, task_matrices: dict[str, torch.Tensor], renormalise_old: str = "") -> None:
        """Add one task's normalised covariances; maps matching `renormalise_old` first scale their
        running sum to unit norm (the paper's `visual.proj`). Collective under torch.distributed
        with `eigen` storage (rank 0 decomposes, every rank receives)."""
        pattern = re.compile(renormalise_old) if renormalise_old else None
        for name, mat in task_matrices.items():
            mat = mat.detach().to(torch.float64)
            old = self.covariances.get(name)
            if old is not None:
                old = old.to(mat.device)
                if pattern is not None and pattern.match(name):
                    old = old / old.norm().clamp_min(1e-30)
                mat = old + mat
            self.covariances[name] = self._stored_form(name, mat)
        self.num_tasks += 1

    def _stored_form(self, name: str, running: torch.Tensor) -> torch.Tensor:
        self.spectra.pop(name, None)
        if self.storage == "float32":
            return running.to("cpu", torch.float32).to(torch.float64)
        if self.storage == "eigen":
            spectrum = eigendecompose(running).truncated(self.storage_energy)
            spectrum.vectors = spectrum.vectors.float()
            self.spectra[name] = spectrum
            return spectrum.matrix()
        return running.to("cpu")

    def spectrum(self, name: str, device: torch.device | str | None = None) -> Spectrum:
        """The eigendecomposition of a map's running covariance, computed once (rank 0, broadcast)."""
        if name not in self.spectra:
            self.spectra[name] = eigendecompose(self.covariances[name], device)
        return self.spectra[name]

    def is_empty(self) -> bool:
        return not self.covariances

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], num_tasks: int) -> "ProjectorStatistics":
        """Statistics of the first state format: float64 matrices named `cov.<map>` among the extras."""
        covs = {k[len("cov."):]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("cov.")}
        return cls(covs, num_tasks, storage="float64")


def split_spectrum(spectrum: Spectrum, rule: Rule, threshold: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(V₁ range, V₂ null space) of a spectrum by `rule`; V₂ is None when the spectrum is truncated
    (the null space then also holds every eigenvector not kept, so it is used as I − V₁V₁ᵀ)."""
    values, vectors = spectrum.values.double(), spectrum.vectors.double()
    if rule == "energy":
        tail = values.flip(0).cumsum(0).flip(0) + spectrum.residual  # tail[k] = Σ_{i ≥ k} λ_i
        if spectrum.residual >= threshold * spectrum.total() > 0:
            raise ConfigError(f"these statistics were stored keeping less than {1 - threshold:.4g} of the energy; "
                              f"ρ = {threshold} needs a larger projection.threshold or statistics stored with more")
        inside = (tail < threshold * spectrum.total()).nonzero()
        split = int(inside[0]) if len(inside) else len(values)
    elif rule == "cutoff":
        if not spectrum.complete:
            raise ConfigError("the cut-off rule needs every eigenvalue, but these statistics were stored "
                              "eigen-truncated; use the energy rule with them")
        lam_min = values[-1].clamp_min(_EIG_FLOOR * values[0])
        split = int((values > threshold * lam_min).sum())
    else:
        raise ConfigError(f"unknown null-space rule {rule!r}; use 'energy' or 'cutoff'")
    return vectors[:, :split], (vectors[:, split:] if spectrum.complete else None)


def null_space_basis(covariance: torch.Tensor, rule: Rule, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the eigenvectors of a covariance into (V₁ range, V₂ null space), by `rule`."""
    range_basis, null_basis = split_spectrum(eigendecompose(covariance, broadcast=False), rule, threshold)
    assert null_basis is not None
    return range_basis, null_basis


class _MapProjector:
    """Projects one map's matrices onto its null space with the cheaper factorisation.

    Keeping k columns costs O(k) per projection: with V₂ (k₂ columns) it is V₂V₂ᵀ; with V₁ it is
    I − V₁V₁ᵀ. Whichever basis is smaller is stored (V₁ when V₂ is not known explicitly).
    """

    def __init__(self, linear_map: LinearMap, range_basis: torch.Tensor, null_basis: torch.Tensor | None) -> None:
        self.map = linear_map
        device, dtype = linear_map.weight.device, linear_map.weight.dtype
        self.use_null = null_basis is not None and null_basis.shape[1] <= range_basis.shape[1]
        basis = null_basis if self.use_null else range_basis
        self.basis = basis.to(device, dtype)
        self.null_dim = range_basis.shape[0] - range_basis.shape[1]

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
            if m.name not in stats.covariances:
                raise KeyError(f"no statistics for {m.name}; were they collected with the same scope?")
            spectrum = stats.spectrum(m.name, m.weight.device)
            range_basis, null_basis = split_spectrum(spectrum, config.rule, config.threshold)
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
