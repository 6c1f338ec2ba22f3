"""Built-in tasks: each available one loads with readable names and a fixed, disjoint split."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gnsp_core.data import builtin as builtin_tasks
from gnsp_core.data.builtin import (
    BUILTIN_TASKS, builtin_available, load_builtin,
)
from gnsp_core.data import load_task
from gnsp_core.errors import DatasetError

EXPECTED = {  # name: (classes, default train size, default test size)
    "digits": (10, 1000, 500),
    "mnist": (10, 1000, 500),
    "animals": (10, 1000, 500),
    "textiles": (3, 900, 300),
    "fashion": (10, 1000, 500),
}


def _require(name: str) -> None:
    if not builtin_available(name):
        pytest.skip(f"{name} is not installed here ({BUILTIN_TASKS[name].install})")


def test_registry() -> None:
    assert set(BUILTIN_TASKS) == set(EXPECTED)
    assert not builtin_available("nope")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_loads(name: str) -> None:
    _require(name)
    n_classes, n_train, n_test = EXPECTED[name]
    task = load_task(name)
    assert task.name == name and len(task.classnames) == n_classes
    assert len(set(task.classnames)) == n_classes and all(c and not c.isdigit() for c in task.classnames)
    assert (len(task.train), len(task.test)) == (n_train, n_test)
    assert set(task.train.labels) == set(task.test.labels) == set(range(n_classes))
    for samples in (task.train, task.test):
        img, label = samples[len(samples) // 2]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and 0 <= label < n_classes


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_split_is_fixed_and_disjoint(name: str) -> None:
    _require(name)
    pool = BUILTIN_TASKS[name].pool()
    assert not set(pool.train_idx.tolist()) & set(pool.test_idx.tolist())
    fresh = BUILTIN_TASKS[name].pool.__wrapped__()  # recomputed, bypassing the cache
    assert np.array_equal(pool.train_idx, fresh.train_idx) and np.array_equal(pool.test_idx, fresh.test_idx)
    a, b = load_task(name), load_task(name, seed=7)  # the seed does not move a built-in's split
    assert a.train.labels == b.train.labels
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.test.images[:50], b.test.images[:50]))


def test_caps_can_be_raised_and_lowered() -> None:
    _require("digits")
    small = load_task("digits", max_train_per_class=5, max_test_per_class=2)
    assert (len(small.train), len(small.test)) == (50, 20)
    big = load_builtin("digits", max_train_per_class=10_000)
    assert len(big.train) == len(BUILTIN_TASKS["digits"].pool().train_idx) > 1000
    kept = {np.asarray(x).tobytes() for x in load_task("digits").train.images}
    assert sum(np.asarray(x).tobytes() in kept for x in small.train.images) == 50  # caps nest deterministically


def test_textile_files_are_disjoint_paths() -> None:
    _require("textiles")
    task = load_task("textiles", max_train_per_class=1000, max_test_per_class=1000)
    assert not set(task.train.images) & set(task.test.images)
    assert len(task.train) + len(task.test) == 2000


def test_digits_are_scaled_to_full_range() -> None:
    _require("digits")
    pixels = np.stack([np.asarray(x) for x in load_task("digits").train.images[:100]])
    assert pixels.dtype == np.uint8 and pixels.max() == 255 and pixels.min() == 0


def test_missing_builtin_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin_tasks, "FASHION_DIR", builtin_tasks.FASHION_DIR / "not-here")
    assert not builtin_available("fashion")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_task("fashion")


def test_class_group_is_the_builtin_restricted_and_relabelled() -> None:
    _require("digits")
    whole, group = load_task("digits"), load_task("digits:3-5")
    assert group.name == "digits:3-5" and group.classnames == ["three", "four", "five"]
    assert sorted(set(group.train.labels)) == [0, 1, 2] and len(group.test) == 150
    expected = {np.asarray(x).tobytes() for x, y in zip(whole.test.images, whole.test.labels) if 3 <= y <= 5}
    assert {np.asarray(x).tobytes() for x in group.test.images} == expected  # the same fixed split
    for bad in ("digits:5-3", "digits:0-10"):
        with pytest.raises(DatasetError, match="class group"):
            load_task(bad)
    with pytest.raises(DatasetError, match="unknown task source"):
        load_task("nope:0-1")
