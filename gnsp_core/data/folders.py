"""ImageFolder trees: validated so a bad upload fails at once with a message that names the file
by its path inside the dataset (the user's own names, never the folder it was extracted to),
and written (`write_image_folder`) in the one layout every part of gnsp reads back.

Accepted layouts (hidden entries such as `.DS_Store` and `__MACOSX/` are ignored):
    root/<class>/<images, nested folders allowed>
    root/train/<class>/...  +  root/test/<class>/...
either of them optionally wrapped in one top-level folder, and optionally with `classes.json` at
the layout root, in one of two forms:
    {"n01": "tabby cat", "n02": "sports car"}                      folder -> class name
    {"classes": {"n01": "tabby cat"}, "templates": ["a photo of a {}, a type of pet.", "..."]}
The second adds the task's prompt templates (`{}` = the class name): the first is the training
prompt, all of them make the zero-shot head the task is scored with. Both keys are optional there.
Images must be one of IMAGE_FORMATS.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from gnsp_core.data.archives import ArchiveLimits
from gnsp_core.data.samples import DEFAULT_TEMPLATES, ImageSamples, check_templates, to_rgb
from gnsp_core.errors import DatasetError

CLASSES_FILE = "classes.json"
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
"""The image formats a dataset (and a classify request) may use: the common ones, each read by
Pillow's own decoders. Others Pillow can open (TIFF with its many codecs, PSD, EPS through
Ghostscript, ICO, ...) are refused: every extra parser is more code an uploaded file can reach.
A GIF counts by its first frame."""
_SPLITS = ("train", "test")


@dataclass
class FolderLayout:
    """A validated ImageFolder tree: class folders (sorted = label ids), names, files per split."""

    root: Path
    folders: list[str]
    classnames: list[str]
    splits: dict[str, dict[str, list[Path]]]
    """{"all": ...} without split folders, else {"train": ..., "test": ...}; folder -> image files."""
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    """The prompt templates from classes.json, else the default ensemble."""


def validate_image_folder(root: str | Path, limits: ArchiveLimits = ArchiveLimits()) -> FolderLayout:
    """Check a folder is a usable task (every file a decodable image within limits, 2+ classes,
    an image in every class) and map its classes and files."""
    top = Path(root)
    if not top.is_dir():
        raise DatasetError(f"{top} is not a folder")
    root = _unwrap(top)
    names = {p.name for p in _visible(root)}
    if names & set(_SPLITS):
        splits = _scan_splits(root, names, top)
    else:
        splits = {"all": _scan_classes(root, allow_classes_json=True, top=top)}
    folders = sorted(splits.get("train", splits.get("all", {})))
    if len(folders) < 2:
        raise DatasetError(
            f"found {len(folders)} class folder(s) {folders} {_where(root, top)}; a task needs at least 2 classes, "
            "each a folder of images"
        )
    _check_counts(splits, limits)
    for split in splits.values():
        for files in split.values():
            for f in files:
                check_image(f, limits, top)
    mapping, templates = {}, DEFAULT_TEMPLATES
    if (root / CLASSES_FILE).is_file():
        mapping, templates = read_classes_json(root / CLASSES_FILE, folders)
    classnames = [mapping.get(f, f.replace("_", " ").strip()) for f in folders]
    _check_unique(classnames, folders)
    return FolderLayout(root=root, folders=folders, classnames=classnames, splits=splits, templates=templates)


def read_classes_json(path: Path, folders: list[str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """Parse classes.json into (folder -> class name, templates), checking it names only existing
    folders and that every template has one `{}`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f'{CLASSES_FILE} is not valid JSON ({e}); write an object like {{"cat_1": "cat"}}') from e
    if not _structured(data):
        return _class_mapping(data, folders), DEFAULT_TEMPLATES
    extra = sorted(set(data) - {"classes", "templates"})
    if extra:
        raise DatasetError(f'{CLASSES_FILE} has unknown keys {extra}; it takes "classes" and "templates"')
    templates = data.get("templates", DEFAULT_TEMPLATES)
    if not isinstance(templates, list | tuple):
        raise DatasetError(f'"templates" in {CLASSES_FILE} must be a list of strings, e.g. ["a photo of a {{}}."]')
    return _class_mapping(data.get("classes", {}), folders), check_templates(templates)


def _structured(data: object) -> bool:
    """classes.json with "classes"/"templates" keys rather than a plain folder -> name mapping."""
    return isinstance(data, dict) and (isinstance(data.get("templates"), list) or isinstance(data.get("classes"), dict))


def _class_mapping(mapping: object, folders: list[str]) -> dict[str, str]:
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise DatasetError(f"{CLASSES_FILE} must be a JSON object mapping folder names to class-name strings")
    unknown = sorted(set(mapping) - set(folders))
    if unknown:
        raise DatasetError(f"{CLASSES_FILE} names folders that do not exist: {unknown}; class folders: {folders}")
    if any(not v.strip() for v in mapping.values()):
        raise DatasetError(f"{CLASSES_FILE} maps a folder to an empty name; give every class a name")
    return {k: v.strip() for k, v in mapping.items()}


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not _hidden(p.name))


def _shown(path: Path, top: Path | None) -> str:
    """How a message names `path`: relative to the dataset's top folder, as the user laid it out."""
    return path.relative_to(top).as_posix() if top is not None and path.is_relative_to(top) else str(path)


def _where(folder: Path, top: Path) -> str:
    return "at the top of the dataset" if folder == top else f"in {_shown(folder, top)}/"


def _unwrap(root: Path) -> Path:
    """Step into a single wrapping folder (as archives often have) that holds only folders."""
    entries = _visible(root)
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in _SPLITS:
        inner = [p for p in _visible(entries[0]) if p.name != CLASSES_FILE]
        if inner and all(p.is_dir() for p in inner):
            return entries[0]
    return root


def _scan_splits(root: Path, names: set[str], top: Path) -> dict[str, dict[str, list[Path]]]:
    missing = [s for s in _SPLITS if not (root / s).is_dir()]
    if missing:
        raise DatasetError(
            f"the dataset has a {'/'.join(s for s in _SPLITS if s not in missing)}/ folder but no {missing[0]}/ "
            f"folder {_where(root, top)}; provide both train/ and test/, or put the class folders at the top level"
        )
    extra = sorted(names - set(_SPLITS) - {CLASSES_FILE})
    if extra:
        raise DatasetError(f"unexpected entries {extra} beside train/ and test/ {_where(root, top)}; "
                           "move or delete them")
    splits = {s: _scan_classes(root / s, allow_classes_json=False, top=top) for s in _SPLITS}
    unknown = sorted(set(splits["test"]) - set(splits["train"]))
    if unknown:
        raise DatasetError(f"test/ has classes {unknown} that train/ lacks; add them to train/ or remove them")
    return splits


def _scan_classes(folder: Path, allow_classes_json: bool, top: Path | None = None) -> dict[str, list[Path]]:
    classes: dict[str, list[Path]] = {}
    for entry in _visible(folder):
        if entry.is_dir():
            files = sorted(p for p in entry.rglob("*") if p.is_file() and not _hidden_below(p, entry))
            if not files:
                raise DatasetError(f"class folder {_shown(entry, top)}/ has no images; add images or delete the folder")
            classes[entry.name] = files
        elif not (allow_classes_json and entry.name == CLASSES_FILE):
            raise DatasetError(
                f"{_shown(entry, top)} is a file outside any class folder; images belong in <class>/ folders "
                f"and the only other file allowed is {CLASSES_FILE} at the top"
            )
    return classes


def _hidden_below(path: Path, top: Path) -> bool:
    return any(_hidden(part) for part in path.relative_to(top).parts)


def check_image(path: Path, limits: ArchiveLimits, top: Path | None = None) -> None:
    """Raise DatasetError unless `path` is a decodable image within the size limits; the message
    names it relative to `top`, the dataset's folder, when given."""
    name = _shown(path, top)
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise DatasetError(f"{name} is {size} bytes, over the {limits.max_file_bytes}-byte limit; shrink it")
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            width, height = img.size
            if width * height > limits.max_image_pixels:
                raise DatasetError(
                    f"{name} is {width}x{height} pixels, over the {limits.max_image_pixels}-pixel limit; downscale it"
                )
            img.verify()
    except DatasetError:
        raise
    except Image.DecompressionBombError:
        raise DatasetError(f"{name} has too many pixels; downscale it") from None
    except Exception as e:  # PIL signals undecodable data with many exception types
        raise DatasetError(f"{name} is not a readable {'/'.join(IMAGE_FORMATS)} image ({type(e).__name__}); "
                           "remove it or re-save it in one of those formats") from None


def _check_counts(splits: dict[str, dict[str, list[Path]]], limits: ArchiveLimits) -> None:
    n = sum(len(files) for split in splits.values() for files in split.values())
    if n > limits.max_files:
        raise DatasetError(f"the dataset has {n} images, more than the limit of {limits.max_files}")


def _check_unique(classnames: list[str], folders: list[str]) -> None:
    seen: dict[str, str] = {}
    for name, folder in zip(classnames, folders):
        key = name.lower()
        if key in seen:
            raise DatasetError(
                f"folders {seen[key]!r} and {folder!r} both become class {name!r}; "
                f"rename one or map it in {CLASSES_FILE}"
            )
        seen[key] = folder


def write_image_folder(root: Path, classnames: Sequence[str], splits: dict[str, ImageSamples],
                       templates: Sequence[str] = DEFAULT_TEMPLATES) -> Path:
    """Write `splits` (e.g. train and test) as an ImageFolder tree under `root`: class folders `c000`,
    `c001`, ... keep the label order and `classes.json` keeps the class names (and templates other
    than the default), so any name survives."""
    folders = [f"c{i:03d}" for i in range(len(classnames))]
    for split, samples in splits.items():
        for n, (image, label) in enumerate(zip(samples.images, samples.labels)):
            target = root / split / folders[label]
            target.mkdir(parents=True, exist_ok=True)
            to_rgb(image).save(target / f"{n:05d}.png")
    names: dict = dict(zip(folders, classnames))
    if tuple(templates) != DEFAULT_TEMPLATES:
        names = {"classes": names, "templates": list(check_templates(templates))}
    (root / CLASSES_FILE).write_text(json.dumps(names, indent=1))
    return root
