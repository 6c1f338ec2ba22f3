"""Projector statistics on disk: one content-addressed file per map, in a compact form.

A running covariance is symmetric, so `float32` keeps its upper triangle in float32 (a quarter
of the float64 matrix, ~1e-7 relative rounding); `eigen` keeps the leading eigenvectors holding a
stated fraction of the energy (float32) with their eigenvalues and the energy dropped; `float64`
is the lossless full matrix. Each map's file is named by the SHA-256 of its content (tensors and
metadata, not the file bytes, so the name does not depend on the serialiser), so two states whose
statistics of a map agree hold byte-identical files of the same name, which a versioned store
keeps once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gnsp_core.errors import StateError
from gnsp_core.projection import ProjectorStatistics
from gnsp_core.spectra import Spectrum

STATS_DIR = "stats"
"""Folder of a state holding the content-addressed statistics files (`<sha256>.safetensors`)."""
_META = "gnsp"


def _triangle(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.triu_indices(dim, dim))  # type: ignore[return-value]


def encode(stats: ProjectorStatistics, name: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """One map's statistics as tensors and metadata, in `stats.storage` form."""
    cov = stats.covariances[name]
    meta: dict[str, object] = {"storage": stats.storage, "dim": cov.shape[0]}
    if stats.storage == "float64":
        return {"covariance": cov.to(torch.float64).contiguous()}, meta
    if stats.storage == "float32":
        rows, cols = _triangle(cov.shape[0])
        return {"upper": cov[rows, cols].to(torch.float32).contiguous()}, meta
    if stats.storage == "eigen":
        spectrum = stats.spectra.get(name) or stats.spectrum(name, "cpu")  # known after add_task; else local
        if spectrum.complete:
            spectrum = spectrum.truncated(stats.storage_energy)
        meta.update(residual=spectrum.residual, energy=stats.storage_energy)
        return {"values": spectrum.values.double().contiguous(),
                "vectors": spectrum.vectors.float().contiguous()}, meta
    raise StateError(f"unknown statistics storage {stats.storage!r}")


def decode(tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> tuple[torch.Tensor, Spectrum | None]:
    """(running covariance as float64, the stored spectrum if the form is `eigen`)."""
    storage, dim = meta["storage"], int(meta["dim"])  # type: ignore[arg-type]
    if storage == "float64":
        return tensors["covariance"].to(torch.float64), None
    if storage == "float32":
        rows, cols = _triangle(dim)
        cov = torch.zeros(dim, dim, dtype=torch.float64)
        cov[rows, cols] = tensors["upper"].to(torch.float64)
        cov[cols, rows] = tensors["upper"].to(torch.float64)
        return cov, None
    if storage == "eigen":
        spectrum = Spectrum(tensors["values"].to(torch.float64), tensors["vectors"], float(meta["residual"]))
        return spectrum.matrix(), spectrum
    raise StateError(f"unknown statistics storage {storage!r}")


def content_address(tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> str:
    """SHA-256 of canonical metadata and each tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def write_statistics(stats: ProjectorStatistics, folder: Path) -> dict[str, str]:
    """Write every map's file under `folder/stats/`; returns map name -> path relative to `folder`."""
    (folder / STATS_DIR).mkdir(parents=True, exist_ok=True)
    files = {}
    for name in sorted(stats.covariances):
        tensors, meta = encode(stats, name)
        meta["map"] = name
        rel = f"{STATS_DIR}/{content_address(tensors, meta)}.safetensors"
        if not (folder / rel).exists():
            save_file(tensors, str(folder / rel), metadata={_META: json.dumps(meta, sort_keys=True)})
        files[name] = rel
    return files


def read_statistics(folder: Path, files: dict[str, str], num_tasks: int, storage: str,
                    storage_energy: float) -> ProjectorStatistics:
    """The statistics a state folder's `state.json` lists."""
    covariances, spectra = {}, {}
    for name, rel in files.items():
        path = folder / rel
        if not path.is_file():
            raise StateError(f"{folder} lists statistics {rel} for {name}, but the file is missing")
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[_META])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        covariances[name], spectrum = decode(tensors, meta)
        if spectrum is not None:
            spectra[name] = spectrum
    return ProjectorStatistics(covariances, num_tasks, storage, storage_energy, spectra)  # type: ignore[arg-type]
