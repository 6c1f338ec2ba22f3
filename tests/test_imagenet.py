"""The ImageNet reference pool on small fake ImageNet trees: names, captions, the seeded choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from gnsp_core.data.imagenet import imagenet_pairs, imagenet_reference, parse_spec, wnid_classnames
from gnsp_core.errors import ConfigError, DatasetError
from service.training.sources import check_reference_spec, load_reference

# Three real ImageNet-1k classes: the first two and the last in ImageNet's sorted order.
CLASSES = {"n01440764": "tench", "n01443537": "goldfish", "n15075141": "toilet paper"}
STRAY_FILE = "LOC_synset_mapping.txt"


def fake_imagenet(root: Path, folders: list[str], per_class: int = 4) -> list[str]:
    """Class folders of small coloured JPEGs; returns the files in ImageFolder order."""
    files = []
    for c, folder in enumerate(sorted(folders)):
        for i in range(per_class):
            path = root / folder / f"{folder}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * c, 10 * i, 200)).save(path)
            files.append(str(path))
    (root / STRAY_FILE).write_text("not an image")  # a file beside the class folders is ignored
    return files


def chosen_files(pairs) -> list[str]:
    return [loader.args[0] for loader in pairs.images]


def test_wordnet_ids_get_clip_class_names():
    names = wnid_classnames()
    assert len(names) == 1000 and {k: names[k] for k in CLASSES} == CLASSES


def test_wnid_tree_gives_seeded_pairs_captioned_with_clip_names(tmp_path: Path):
    files = fake_imagenet(tmp_path, list(CLASSES))
    pairs = imagenet_pairs(tmp_path, 5, seed=42)
    assert len(pairs) == 5
    chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(42))[:5].tolist()
    expected = [f"a photo of a {CLASSES[Path(files[i]).parent.name]}." for i in chosen]
    assert pairs.captions == expected and chosen_files(pairs) == [files[i] for i in chosen]  # random_split's choice
    image, caption = pairs[0]
    assert image.mode == "RGB" and image.size == (8, 8) and caption == expected[0]
    assert chosen_files(imagenet_pairs(tmp_path, 5, seed=42)) == chosen_files(pairs)
    other = torch.randperm(len(files), generator=torch.Generator().manual_seed(7))[:5].tolist()
    assert chosen_files(imagenet_pairs(tmp_path, 5, seed=7)) == [files[i] for i in other] != chosen_files(pairs)
    assert len(imagenet_pairs(tmp_path, 1000)) == len(files)  # fewer images than asked: all of them


def test_plain_class_name_folders(tmp_path: Path):
    fake_imagenet(tmp_path, ["tabby_cat", "sports_car"], per_class=2)
    assert sorted(set(imagenet_pairs(tmp_path).captions)) == ["a photo of a sports car.", "a photo of a tabby cat."]


def test_bad_trees_say_what_is_wrong(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        imagenet_pairs(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no class folders"):
        imagenet_pairs(tmp_path)
    fake_imagenet(tmp_path, ["n01440764", "goldfish"], per_class=1)
    with pytest.raises(DatasetError, match="mixes WordNet-id folders"):
        imagenet_pairs(tmp_path)
    with pytest.raises(DatasetError, match="positive integer"):
        imagenet_pairs(tmp_path, 0)


def test_reference_specs(tmp_path: Path):
    fake_imagenet(tmp_path / "train", list(CLASSES), per_class=3)
    assert parse_spec("imagenet:/data/train") == ("/data/train", 1000)
    assert parse_spec("imagenet:/data/train#250") == ("/data/train", 250)
    assert parse_spec("imagenet:/data/a#b") == ("/data/a#b", 1000)
    assert len(imagenet_reference(f"imagenet:{tmp_path / 'train'}#4")) == 4
    check_reference_spec(f"imagenet:{tmp_path / 'train'}")
    pairs = load_reference(f"imagenet:{tmp_path / 'train'}#6")  # what the CLI and the service's setting load
    assert len(pairs) == 6 and all(c.startswith("a photo of a ") for c in pairs.captions)
    with pytest.raises(DatasetError, match="not a folder"):
        check_reference_spec(f"imagenet:{tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="imagenet:<folder>"):
        check_reference_spec("imagenet")
