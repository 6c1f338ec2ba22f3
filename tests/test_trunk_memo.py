"""Evaluation's trunk memo: a measure is the same whether its trunk rows were remembered or not,
rows are computed once per input and weights, and a folder carries them to a later process."""

from __future__ import annotations

import pytest
import torch

import gnsp_core.trunk_memo as trunk_memo
from conftest import colour_task, reference_pairs
from gnsp_core.evaluation import class_prompt_gap, pair_retrieval, task_accuracy
from gnsp_core.models import ModelSpec, load_model


@pytest.fixture()
def fresh_memos(monkeypatch):
    """An empty process memo for each test (as in a new process)."""
    monkeypatch.setattr(trunk_memo, "_MEMOS", type(trunk_memo._MEMOS)())


def measures(loaded, task, pairs) -> tuple:
    recall = pair_retrieval(loaded, pairs)
    return (task_accuracy(loaded, task), class_prompt_gap(loaded, task)["norm"], *(recall[k] for k in sorted(recall)))


def unremembered(monkeypatch, loaded, task, pairs) -> tuple:
    with monkeypatch.context() as patch:
        patch.setattr(trunk_memo, "_parts", lambda model: [])
        return measures(loaded, task, pairs)


def test_measures_equal_unremembered_ones_and_compute_each_input_once(split_model_registered, fresh_memos,
                                                                      monkeypatch):
    loaded = load_model(ModelSpec(name=split_model_registered, seed=0))
    task, pairs = colour_task("A", ["red", "blue"], n_train=2, n_test=6), reference_pairs(2)
    expected = unremembered(monkeypatch, loaded, task, pairs)
    assert measures(loaded, task, pairs) == pytest.approx(expected, abs=1e-6)
    first = trunk_memo.memo_counts()
    # 12 test images + 8 pair images; 2 prompts x the task's templates + 4 distinct captions
    assert first["image-trunk"] == 12 + 8 and first["text-hf-transformer"] == 2 * len(task.templates) + 4
    assert measures(loaded, task, pairs) == pytest.approx(expected, abs=1e-6)
    assert trunk_memo.memo_counts() == first  # the second measure ran only the heads


def test_a_trunk_that_trained_gets_rows_of_its_own(split_model_registered, fresh_memos, monkeypatch):
    loaded = load_model(ModelSpec(name=split_model_registered, seed=0))
    task, pairs = colour_task("A", ["red", "blue"], n_train=2, n_test=6), reference_pairs(2)
    measures(loaded, task, pairs)
    with torch.no_grad():  # as an optimiser step would: in place
        for parameter in loaded.model.visual.trunk.parameters():
            parameter.mul_(0.5)
    expected = unremembered(monkeypatch, loaded, task, pairs)
    before = trunk_memo.memo_counts()
    assert measures(loaded, task, pairs) == pytest.approx(expected, abs=1e-6)
    after = trunk_memo.memo_counts()
    assert after["image-trunk"] == before["image-trunk"] + 12 + 8  # recomputed with the new weights
    assert after["text-hf-transformer"] == before["text-hf-transformer"]  # the text trunk did not change


def test_a_folder_carries_the_rows_to_a_later_process(split_model_registered, fresh_memos, monkeypatch, tmp_path):
    loaded = load_model(ModelSpec(name=split_model_registered, seed=0))
    task = colour_task("A", ["red", "blue"], n_train=2, n_test=6)
    with trunk_memo.remembered_trunks(loaded.model, tmp_path):
        expected = task_accuracy(loaded, task)
    assert sorted(p.name.split("-")[1] for p in tmp_path.iterdir()) == ["image", "text"]

    monkeypatch.setattr(trunk_memo, "_MEMOS", type(trunk_memo._MEMOS)())  # a new process
    with trunk_memo.remembered_trunks(loaded.model, tmp_path):
        assert task_accuracy(loaded, task) == expected
    assert trunk_memo.memo_counts() == {"image-trunk": 0, "text-hf-transformer": 0}

    for path in tmp_path.iterdir():
        path.write_bytes(b"torn")  # a file cut short is recomputed and rewritten, never read as rows
    monkeypatch.setattr(trunk_memo, "_MEMOS", type(trunk_memo._MEMOS)())
    with trunk_memo.remembered_trunks(loaded.model, tmp_path):
        assert task_accuracy(loaded, task) == expected
    assert trunk_memo.memo_counts()["image-trunk"] == 12
    assert all(p.read_bytes() != b"torn" for p in tmp_path.iterdir())


def test_training_forwards_are_never_remembered(split_model_registered, fresh_memos):
    """With grad enabled (a training step) the trunk runs as it is: nothing is looked up or kept."""
    loaded = load_model(ModelSpec(name=split_model_registered, seed=0))
    pixels = torch.rand(3, 3, 32, 32)
    with trunk_memo.remembered_trunks(loaded.model):
        loaded.model.encode_image(pixels)
    assert trunk_memo.memo_counts() == {"image-trunk": 0, "text-hf-transformer": 0}


def test_a_folder_keeps_the_most_recently_used_files_per_part(split_model_registered, fresh_memos, monkeypatch,
                                                              tmp_path):
    """A trunk that trains writes a file per version: the folder keeps MAX_FILES of them per part."""
    monkeypatch.setattr(trunk_memo, "MAX_FILES", 2)
    loaded = load_model(ModelSpec(name=split_model_registered, seed=0))
    task = colour_task("A", ["red", "blue"], n_train=2, n_test=2)
    for _ in range(3):
        with torch.no_grad():
            for parameter in loaded.model.visual.trunk.parameters():
                parameter.mul_(0.9)
        with trunk_memo.remembered_trunks(loaded.model, tmp_path):
            task_accuracy(loaded, task)
    assert sorted(p.name.split("-")[1] for p in tmp_path.iterdir()) == ["image", "image", "text"]
