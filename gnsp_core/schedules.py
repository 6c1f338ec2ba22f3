"""Per-task schedules: the learning rate and number of optimiser steps of each task of a sequence.

The published GNSP recipe does not train every task alike: each MTIL dataset has its own learning
rate (1e-5 to 5e-5) and iteration count (100 to 1,000), from the official configs
(Ppp-Ttt/GNSP, `configs/mtil_order_I.json`, `configs/mtil_order_II.json`). A schedule maps a task
name to that pair; `Schedule.config_for` gives a task's config. Task names match ignoring case and
anything that is not a letter or digit (`OxfordPet` = `oxford_pet` = `oxfordpet`).

Two ship by name (`SCHEDULES`): `mtil-order-I` and `mtil-order-II` (the same per-dataset values,
in order II's order). Any other schedule is a JSON file, one object per task, in sequence order:

    {"aircraft": {"lr": 1e-5, "steps": 100}, "caltech101": {"lr": 2e-5, "steps": 500}}
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gnsp_core.config import TrainConfig
from gnsp_core.data.mtil import MTIL_ORDER_I, MTIL_ORDER_II
from gnsp_core.errors import ConfigError

SCHEDULE_KEY = "schedule"
"""The config key (REST jobs, config files) that names a shipped schedule."""


@dataclass(frozen=True)
class TaskSchedule:
    """One task's row: its learning rate and optimiser steps."""

    lr: float
    steps: int


@dataclass(frozen=True)
class Schedule:
    """Task name -> (lr, steps), in sequence order."""

    name: str
    rows: tuple[tuple[str, TaskSchedule], ...]

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, Any]) -> "Schedule":
        """From {"task": {"lr": float, "steps": int}, ...}, checking every value."""
        if not isinstance(data, Mapping) or not data:
            raise ConfigError(f"schedule {name!r} must be a non-empty JSON object of "
                              '{"<task>": {"lr": <float>, "steps": <int>}, ...}')
        rows, seen = [], set()
        for task, row in data.items():
            if task_key(task) in seen:
                raise ConfigError(f"schedule {name!r} names task {task!r} twice")
            seen.add(task_key(task))
            rows.append((str(task), _row(name, task, row)))
        return cls(name, tuple(rows))

    @property
    def tasks(self) -> list[str]:
        return [task for task, _ in self.rows]

    def row(self, task: str) -> TaskSchedule:
        """The row of `task` (matched by `task_key`); ConfigError naming the known tasks if absent."""
        for name, row in self.rows:
            if task_key(name) == task_key(task):
                return row
        raise ConfigError(f"schedule {self.name!r} has no row for task {task!r}; it schedules {self.tasks} "
                          "(name the task like one of those, or write a schedule file with a row for it)")

    def check(self, tasks: Iterable[str]) -> None:
        """Every task has a row (raises for the first that has none), before any training starts."""
        for task in tasks:
            self.row(task)

    def config_for(self, config: TrainConfig, task: str) -> TrainConfig:
        """`config` with the task's learning rate and steps."""
        row = self.row(task)
        return config.replace(lr=row.lr, steps=row.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tasks": {task: {"lr": r.lr, "steps": r.steps} for task, r in self.rows}}


def task_key(name: str) -> str:
    """A task name as schedules compare it: lower case, letters and digits only."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def _row(schedule: str, task: str, row: Any) -> TaskSchedule:
    keys = set(row) if isinstance(row, Mapping) else set()
    lr, steps = (row.get("lr"), row.get("steps")) if isinstance(row, Mapping) else (None, None)
    ok = (keys == {"lr", "steps"} and isinstance(lr, int | float) and not isinstance(lr, bool) and lr > 0
          and isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1)
    if not ok:
        raise ConfigError(f"schedule {schedule!r}, task {task!r}: expected {{\"lr\": <number > 0>, "
                          f"\"steps\": <integer >= 1>}}, got {row!r}")
    return TaskSchedule(float(lr), steps)


MTIL_RECIPE: dict[str, tuple[float, int]] = {
    "aircraft": (1e-5, 100), "caltech101": (2e-5, 500), "cifar100": (1e-5, 1000), "dtd": (5e-5, 500),
    "eurosat": (2e-5, 500), "flowers": (2e-5, 1000), "food": (5e-5, 1000), "mnist": (1e-5, 500),
    "oxfordpet": (5e-5, 500), "cars": (5e-5, 1000), "sun397": (2e-5, 1000),
}
"""The official per-dataset (learning rate, iterations) of GNSP on MTIL; the same in both orders."""


def _mtil(name: str, order: Sequence[str]) -> Schedule:
    return Schedule(name, tuple((task, TaskSchedule(*MTIL_RECIPE[task])) for task in order))


SCHEDULES: dict[str, Schedule] = {
    "mtil-order-I": _mtil("mtil-order-I", MTIL_ORDER_I),
    "mtil-order-II": _mtil("mtil-order-II", MTIL_ORDER_II),
}


def shipped_schedule(name: str) -> Schedule:
    """A schedule that ships by name; ConfigError listing them otherwise."""
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; shipped schedules: {sorted(SCHEDULES)}")
    return SCHEDULES[name]


def load_schedule(spec: str | Path) -> Schedule:
    """A shipped schedule by name, or a JSON schedule file (see the module docstring)."""
    if str(spec) in SCHEDULES:
        return SCHEDULES[str(spec)]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"schedule {str(spec)!r} is neither a shipped schedule ({', '.join(sorted(SCHEDULES))}) "
                          "nor a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read schedule {path}: {exc}") from exc
    return Schedule.from_mapping(path.stem, data)


def resolve_schedule(config: Mapping[str, Any], task: str | None) -> tuple[dict[str, Any], list[str]]:
    """A config dict that may name a shipped schedule (`"schedule": NAME`) -> the same dict with the
    task's `lr` and `steps` in its place, and warnings for the job's record. With `task` None only
    the schedule's name is checked.

    A schedule is a table of recommended settings, not a constraint: `lr` or `steps` set beside it
    win over its row (a short smoke run of a scheduled task), and a task with no row trains with
    the settings it would have had without the schedule, with a warning that says so (the task's
    name, not the client's JSON, picks the row, so no request schema could reject the mismatch)."""
    if SCHEDULE_KEY not in config:
        return dict(config), []
    rest = {k: v for k, v in config.items() if k != SCHEDULE_KEY}
    schedule = shipped_schedule(config[SCHEDULE_KEY])
    if task is None:
        return rest, []
    try:
        row = schedule.row(task)
    except ConfigError:
        return rest, [f"schedule {schedule.name!r} has no row for task {task!r}, so the task trains with the "
                      f"service's lr and steps; name the task like one of {schedule.tasks} to use its row"]
    return {"lr": row.lr, "steps": row.steps, **rest}, []
