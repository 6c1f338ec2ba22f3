"""The continual state: what version N+1 needs from version N.

Weights alone are not enough: GNSP needs the running input covariances of every task learned so
far, MG-CLIP its LoRA factors and compensation heads, and every method the task history. A state
is a folder, written atomically: `weights.safetensors`, `extras.safetensors` (method tensors),
`stats/<sha256>.safetensors` (one content-addressed file per protected map's projector
statistics, see `stats_storage`) and `state.json` (spec, config, history, which statistics file
belongs to which map). States of the first format (float64 matrices `cov.<map>` inside
`extras.safetensors`) still load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gnsp_core.atomic_files import fsync_dir, fsync_file
from gnsp_core.errors import StateError
from gnsp_core.models.spec import ModelSpec
from gnsp_core.projection import ProjectorStatistics
from gnsp_core.stats_storage import read_statistics, write_statistics

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)


@dataclass
class TaskRecord:
    """One learned task: enough to re-evaluate it and to explain the version it produced."""

    name: str
    classnames: list[str]
    method: str
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ContinualState:
    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    stats: ProjectorStatistics = field(default_factory=ProjectorStatistics)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[TaskRecord] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def initial(cls, model: torch.nn.Module, spec: ModelSpec) -> "ContinualState":
        """The state before any task: the pre-trained weights and no statistics."""
        return cls(spec=spec, weights=_cpu_copy(model.state_dict()))

    def seen_classnames(self) -> list[str]:
        names: list[str] = []
        for record in self.history:
            names.extend(c for c in record.classnames if c not in names)
        return names

    def save(self, directory: str | Path) -> Path:
        """Write to `directory` atomically: a crash leaves either the old folder or the new one."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            save_file(_contiguous(self.weights), str(tmp / "weights.safetensors"))
            save_file(_contiguous(self.extras), str(tmp / "extras.safetensors"))
            meta = {
                "format": FORMAT_VERSION,
                "spec": self.spec.to_dict(),
                "num_stat_tasks": self.stats.num_tasks,
                "stats": {"storage": self.stats.storage, "storage_energy": self.stats.storage_energy,
                          "files": write_statistics(self.stats, tmp)},
                "history": [asdict(r) for r in self.history],
                "config": self.config,
            }
            (tmp / "state.json").write_text(json.dumps(meta, indent=2))
            for path in tmp.rglob("*"):
                if path.is_file():
                    fsync_file(path)
            fsync_dir(tmp / "stats") if (tmp / "stats").is_dir() else None
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(directory, old)
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, directory)
            fsync_dir(directory.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ContinualState":
        directory = Path(directory)
        files = [directory / n for n in ("state.json", "weights.safetensors", "extras.safetensors")]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise StateError(f"{directory} is not a continual state (missing {', '.join(missing)})")
        meta = json.loads(files[0].read_text())
        if meta.get("format") not in READABLE_FORMATS:
            raise StateError(f"{directory} has state format {meta.get('format')}; this version reads {READABLE_FORMATS}")
        extras = load_file(str(files[2]))
        if meta["format"] == 1:
            stats = ProjectorStatistics.from_tensors(extras, meta["num_stat_tasks"])
        else:
            saved = meta["stats"]
            stats = read_statistics(directory, saved["files"], meta["num_stat_tasks"], saved["storage"],
                                    saved["storage_energy"])
        return cls(
            spec=ModelSpec.from_dict(meta["spec"]),
            weights=load_file(str(files[1])),
            stats=stats,
            extras={k: v for k, v in extras.items() if not k.startswith("cov.")},
            history=[TaskRecord(**r) for r in meta["history"]],
            config=meta.get("config", {}),
        )


def _cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
