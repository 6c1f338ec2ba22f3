"""What a search is: tasks, model, base training config, search space and budget, as plain data.

The same `TuneRequest` comes from `gnsp tune` flags and from the JSON body of `POST /v1/tune`,
and is saved as `request.json` in the output folder so an interrupted search resumes with exactly
the same settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gnsp_core.config import TrainConfig, check_keys
from gnsp_core.errors import ConfigError
from gnsp_core.models import ModelSpec

REQUEST_FILE = "request.json"
SEARCHERS = ("optuna", "random")
PAPER_POINT = {"threshold": 0.15, "cd_weight": 1.0, "map_weight": 0.75}
"""The published GNSP recipe (ρ = 0.15, L = CE + 1.0 CD + 0.75 MAP): always the first trial, as the baseline."""


@dataclass(frozen=True)
class SearchSpace:
    """Ranges (low, high) of the searched values; threshold and lr are sampled log-uniformly."""

    threshold: tuple[float, float] = (0.01, 0.5)
    """Energy-tail ρ: the null space holds less than ρ of the old inputs' energy. Log scale: the
    protection changes most at small ρ."""
    cd_weight: tuple[float, float] = (0.0, 2.0)
    map_weight: tuple[float, float] = (0.0, 1.5)
    lr: tuple[float, float] = (3e-6, 1e-4)
    """Around the paper's per-task 1e-5..5e-5."""

    def check(self) -> None:
        for name in ("threshold", "cd_weight", "map_weight", "lr"):
            low, high = getattr(self, name)
            if not 0 <= low < high or (name in ("threshold", "lr") and low <= 0):
                raise ConfigError(f"search range {name} must be 0 <= low < high (low > 0 for log scales), got {low}, {high}")

    def first_point(self, lr: float) -> dict[str, float]:
        """The paper's point, clipped into the ranges; `lr` is the base config's."""
        point = {**PAPER_POINT, "lr": lr}
        return {k: min(max(v, getattr(self, k)[0]), getattr(self, k)[1]) for k, v in point.items()}


@dataclass
class TuneRequest:
    """One search: trials learn `tasks` in order, from `model` (or from the state in `base_state`)."""

    tasks: list[str]
    out_dir: str
    model: ModelSpec = field(default_factory=ModelSpec)
    base_state: str | None = None
    """Tune the next task(s) of a continual state folder instead of a sequence from the model."""
    trials: int = 12
    config: TrainConfig = field(default_factory=TrainConfig)
    """Everything not searched (method gnsp, steps, batch size, ...); best.json is this plus the winner."""
    space: SearchSpace = field(default_factory=SearchSpace)
    searcher: str = "optuna"
    workers: int = 1
    gpus_per_worker: float = 0.0
    max_concurrent: int | None = None
    """Trials at once; None: as many as the cluster's CPUs (or GPUs) fit."""
    max_train_per_class: int | None = None
    val_fraction: float = 0.2
    """Share of each task's TRAIN split held out for validation."""
    seed: int = 0
    job_id: str | None = None
    """Names the Ray Tune run; None: derived from out_dir, so a re-run finds its experiment."""

    def __post_init__(self) -> None:
        out = Path(self.out_dir).resolve()
        self.out_dir = str(out)
        if self.job_id is None:
            self.job_id = f"{out.name}-{hashlib.sha1(str(out).encode()).hexdigest()[:8]}"
        self.check()

    def check(self) -> None:
        """Reject a search that cannot run, before Ray starts."""
        if not self.tasks:
            raise ConfigError("a search needs at least one task")
        if self.config.method != "gnsp":
            raise ConfigError(f"tune searches GNSP's threshold and loss weights; method must be gnsp, not {self.config.method!r}")
        if self.config.projection.rule == "energy" and self.space.threshold[1] >= 1:
            raise ConfigError("with the energy rule the threshold is a fraction of energy: keep its range below 1")
        if self.searcher not in SEARCHERS:
            raise ConfigError(f"unknown searcher {self.searcher!r}; choose one of {SEARCHERS}")
        if self.trials < 1 or self.workers < 1 or not 0 < self.val_fraction < 1:
            raise ConfigError("trials and workers must be >= 1 and val_fraction between 0 and 1")
        self.space.check()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TuneRequest":
        """From JSON (a REST body or request.json); unknown keys are an error."""
        check_keys(cls, data, "tune request")
        data = dict(data)
        try:
            if isinstance(data.get("model"), dict):
                data["model"] = ModelSpec.from_dict(data["model"])
            if isinstance(data.get("config"), dict):
                data["config"] = TrainConfig.from_dict(data["config"])
            if isinstance(data.get("space"), dict):
                data["space"] = SearchSpace(**{k: tuple(v) for k, v in data["space"].items()})
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad tune request: {exc}") from exc

    def save(self) -> Path:
        path = Path(self.out_dir) / REQUEST_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, out_dir: str | Path) -> "TuneRequest":
        path = Path(out_dir) / REQUEST_FILE
        if not path.is_file():
            raise ConfigError(f"{out_dir} holds no search to resume (no {REQUEST_FILE})")
        return cls.from_dict(json.loads(path.read_text()))
