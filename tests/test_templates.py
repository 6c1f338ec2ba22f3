"""Prompt templates on tasks: the default ensemble, checks, and templates shipped in classes.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data import make_tree

from gnsp_core.data import ImageSamples, Task, load_task
from gnsp_core.data.folders import write_image_folder
from gnsp_core.data.samples import DEFAULT_TEMPLATES
from gnsp_core.errors import DatasetError
from gnsp_core.zeroshot import TEMPLATES


def test_the_default_ensemble_is_clip_s_imagenet_selection():
    assert DEFAULT_TEMPLATES[0] == "a photo of a {}." and len(DEFAULT_TEMPLATES) == 8
    assert list(DEFAULT_TEMPLATES) == TEMPLATES


def test_classes_json_may_give_the_task_templates(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"n01": 3, "n02": 3})
    templates = ["a photo of a {}, a type of pet.", "a photo of the {}, a type of pet."]
    (root / "classes.json").write_text(json.dumps({"classes": {"n01": "tabby cat"}, "templates": templates}))
    task = load_task(str(root))
    assert task.classnames == ["tabby cat", "n02"] and task.templates == tuple(templates)
    (root / "classes.json").write_text(json.dumps({"templates": ["{} texture."]}))
    assert load_task(str(root)).templates == ("{} texture.",)
    (root / "classes.json").write_text(json.dumps({"n01": "tabby cat"}))
    assert load_task(str(root)).templates == DEFAULT_TEMPLATES


def test_written_folders_keep_names_and_templates(tmp_path: Path) -> None:
    task = load_task(str(make_tree(tmp_path / "ds", {"a": 3, "b": 3})))
    for templates in (("a photo of the number: \"{}\".",), DEFAULT_TEMPLATES):
        root = write_image_folder(tmp_path / f"out{len(templates)}", ["one", "two"],
                                  {"train": task.train, "test": task.test}, templates)
        again = load_task(str(root))
        assert again.classnames == ["one", "two"] and again.templates == templates


def test_templates_are_checked() -> None:
    samples = ImageSamples([], [])
    assert Task("t", ["a"], samples, samples).templates == DEFAULT_TEMPLATES
    assert Task("t", ["a"], samples, samples, templates=["{}!"]).templates == ("{}!",)
    for bad in ([], "a photo of a {}.", ["a photo"], ["{} and {}"], ["a {0} photo"], ["{x} {}"], [3]):
        with pytest.raises(DatasetError, match="template"):
            Task("t", ["a"], samples, samples, templates=bad)


@pytest.mark.parametrize(
    "content, match",
    [('{"templates": ["a photo"]}', "exactly once"), ('{"templates": []}', "non-empty"),
     ('{"classes": {"n01": "x"}, "templates": ["{}"], "extra": 1}', "unknown keys"),
     ('{"classes": {"n09": "x"}}', "do not exist"),
     ('{"classes": {"n01": "x"}, "templates": "{}"}', "list of strings")],
)
def test_bad_templates_in_classes_json(tmp_path: Path, content: str, match: str) -> None:
    root = make_tree(tmp_path / "ds", {"n01": 2, "n02": 2})
    (root / "classes.json").write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_task(str(root))
