"""What a search is: tasks, model, base training config, search space and budget, as plain data.

The same `TuneRequest` comes from `gnsp tune` flags and from the JSON body of `POST /v1/tune`,
and is saved as `request.json` in the search's folder so an interrupted search resumes with exactly
the same settings. A CLI search's folder is a local `--out` folder; a REST search's is
`<store>/tune/<job_id>/` (`store` set, `out_dir` relative to it), and it names its base version
and its uploaded dataset by their place in the store, never by a path of the service's node.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gnsp_core.config import EXACT_CUTOFF, TrainConfig, check_keys
from gnsp_core.errors import ConfigError
from gnsp_core.models import ModelSpec
from service.training.naming import run_name
from service.tuning.folder import SearchFolder

REQUEST_FILE = "request.json"
SEARCHERS = ("optuna", "random")
PAPER_POINT = {"threshold": 0.15, "cd_weight": 1.0, "map_weight": 0.75}
"""The published GNSP recipe (ρ = 0.15, L = CE + 1.0 CD + 0.75 MAP): always the first trial, as the baseline."""
CUTOFF_POINT = EXACT_CUTOFF
"""The first trial's threshold with the cut-off rule: the `gnsp-exact` preset's a."""
DEFAULT_THRESHOLD = {"energy": (0.01, 0.5), "cutoff": (10.0, 1e5)}
"""The threshold range searched when a request leaves it out, by projection rule: ρ log-uniform where
the protection changes most (small ρ), a log-uniform over the decades around the exact preset's."""


def projection_for_range(ends: Sequence[float]) -> dict[str, Any]:
    """The projection rule a threshold range searches, as config data: ρ < 1 is the energy rule's,
    a >= 1 the cut-off rule's (the two domains do not meet, so the range names its rule). The
    threshold is the range's low end, a valid value of the rule; each trial sets its own."""
    return {"rule": "cutoff" if min(ends) >= 1 else "energy", "threshold": float(min(ends))}


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the searched values; threshold and lr are sampled log-uniformly.

    A range's two ends may come in either order (they are stored low, high); equal ends fix the
    value. `threshold` None: the default range of the config's projection rule (DEFAULT_THRESHOLD)."""

    threshold: tuple[float, float] | None = None
    """Energy-tail ρ in (0, 1), or the cut-off rule's a >= 1 (TuneRequest.check ties it to the rule)."""
    cd_weight: tuple[float, float] = (0.0, 2.0)
    map_weight: tuple[float, float] = (0.0, 1.5)
    lr: tuple[float, float] = (3e-6, 1e-4)
    """Around the paper's per-task 1e-5..5e-5."""

    def __post_init__(self) -> None:
        for name in ("threshold", "cd_weight", "map_weight", "lr"):
            ends = getattr(self, name)
            if ends is not None:
                if len(ends) != 2:
                    raise ConfigError(f"search range {name} must be two numbers [low, high], got {list(ends)}")
                object.__setattr__(self, name, tuple(sorted(ends)))

    def for_rule(self, rule: str) -> "SearchSpace":
        """This space with the rule's default threshold range where it has none."""
        return self if self.threshold is not None else dataclasses.replace(self, threshold=DEFAULT_THRESHOLD[rule])

    def check(self) -> None:
        for name in ("threshold", "cd_weight", "map_weight", "lr"):
            low, high = getattr(self, name) or DEFAULT_THRESHOLD["energy"]
            if low < 0 or (name in ("threshold", "lr") and low <= 0):
                raise ConfigError(f"search range {name} must be >= 0 (> 0 for log scales), got {low}, {high}")

    def first_point(self, lr: float) -> dict[str, float]:
        """The paper's point, clipped into the ranges; `lr` is the base config's."""
        threshold = self.threshold or DEFAULT_THRESHOLD["energy"]
        point = {**PAPER_POINT, "lr": lr, **({"threshold": CUTOFF_POINT} if threshold[0] >= 1 else {})}
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
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each training worker asks for (the service's `worker_resources`): where trials train."""
    max_concurrent: int | None = None
    """Trials at once; None: as many as the cluster's CPUs (or GPUs) fit."""
    trial_retries: int = 1
    """Times Tune restarts a failed trial within the run, from its last finished task: one is
    enough for a node lost mid-trial (its trial and its Ray Train workers go with it). Tune cannot
    tell that from an error that will repeat (a broken dataset), which then fails again at the cost
    of one trial start; `gnsp tune --resume` retries it after a fix."""
    max_train_per_class: int | None = None
    val_fraction: float = 0.2
    """Share of each task's TRAIN split held out for validation."""
    seed: int = 0
    job_id: str | None = None
    """Names the Ray Tune run; None: derived from out_dir, so a re-run finds its experiment."""
    store: str | None = None
    """The store the search lives in (REST searches); `out_dir` is then a folder inside it."""
    base_version: int | None = None
    """Start from this version of `store` instead of a `base_state` folder (REST searches)."""
    scratch_dir: str | None = None
    """Node-local scratch where the driver and the trials fetch stored inputs (None: the system temp dir)."""

    def __post_init__(self) -> None:
        if self.store is None:
            self.out_dir = str(Path(self.out_dir).resolve())
        if self.job_id is None:
            self.job_id = run_name(self.out_dir)
        if self.config.projection.rule in DEFAULT_THRESHOLD:
            self.space = self.space.for_rule(self.config.projection.rule)
        self.check()

    def check(self) -> None:
        """Reject a search that cannot run, before Ray starts."""
        if not self.tasks:
            raise ConfigError("a search needs at least one task")
        if self.trial_retries < 0:
            raise ConfigError(f"trial_retries must be 0 or more, not {self.trial_retries}")
        if self.base_version is not None and (self.store is None or self.base_state is not None):
            raise ConfigError("base_version names a version of the search's store, instead of base_state")
        if self.config.method != "gnsp":
            raise ConfigError(f"tune searches GNSP's threshold and loss weights; method must be gnsp, not {self.config.method!r}")
        if self.config.projection.rule == "energy" and self.space.threshold[1] >= 1:
            raise ConfigError("with the energy rule the threshold is a share of the energy: keep its range below 1")
        if self.config.projection.rule == "cutoff" and self.space.threshold[0] < 1:
            raise ConfigError("with the cut-off rule the threshold is a multiple a ≥ 1 of λ_min: keep its range at or above 1")
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
                data["space"] = SearchSpace(**{k: None if v is None else tuple(v) for k, v in data["space"].items()})
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad tune request: {exc}") from exc

    def folder(self) -> SearchFolder:
        """Where the search lives: `out_dir` in the store, or the local folder `out_dir`."""
        return SearchFolder(self.store, self.out_dir) if self.store is not None else SearchFolder.local(self.out_dir)

    def save(self) -> None:
        """File the request once, atomically. It is never rewritten (readers such as the API may be
        reading it at any moment): saving the same request again is a no-op, a different one an error."""
        folder = self.folder()
        saved = folder.read_json(REQUEST_FILE)
        if saved is not None:
            if saved != json.loads(json.dumps(self.to_dict())):
                raise ConfigError(f"{folder} already holds a different search request; "
                                  "resume it with `gnsp tune --resume` or choose a new output folder")
            return
        folder.write_text(REQUEST_FILE, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, out_dir: str | Path | SearchFolder) -> "TuneRequest":
        folder = out_dir if isinstance(out_dir, SearchFolder) else SearchFolder.local(out_dir)
        saved = folder.read_json(REQUEST_FILE)
        if saved is None:
            raise ConfigError(f"{folder} holds no search to resume (no {REQUEST_FILE})")
        return cls.from_dict(saved)
