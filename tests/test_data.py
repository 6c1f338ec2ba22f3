"""Task sources: ImageSamples, ImageFolder trees, archives and their safety checks."""

from __future__ import annotations

import io
import json
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gnsp_core.data.archives import _Budget, _copy_counted
from gnsp_core.data import (
    ArchiveLimits, ImageSamples, load_task, safe_extract, split_per_class, validate_image_folder,
)
from gnsp_core.errors import ArchiveTypeError, DatasetError

SMALL = ArchiveLimits(max_files=50, max_total_bytes=200_000, max_file_bytes=100_000, max_image_pixels=10_000)


def png_bytes(size: int = 8, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def make_tree(root: Path, counts: dict[str, int]) -> Path:
    """root/<class>/<i>.png with a distinct colour per image."""
    for c, (cls, n) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / cls / f"{i:03d}.png").write_bytes(png_bytes(color=(c * 40 % 256, i * 7 % 256, 9)))
    return root


def zip_of(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def tar_of(path: Path, entries: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def tree_entries(counts: dict[str, int], prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{cls}/{i}.png": png_bytes(color=(i, 5, 5)) for cls, n in counts.items() for i in range(n)}


# ---------------------------------------------------------------- ImageSamples / Task


def test_image_samples_accept_paths_pil_and_arrays(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes())
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    items = [str(path), path, Image.new("L", (5, 5)), np.zeros((6, 6), np.uint8), np.zeros((3, 3, 3), np.uint8), rgba]
    samples = ImageSamples(items, [0, 1, 2, 3, 4, 5])
    for i in range(len(samples)):
        img, label = samples[i]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and label == i
    assert samples[5][0].getpixel((0, 0)) == (255, 255, 255)  # transparency -> white background
    assert samples[3][0].size == (6, 6)


def test_image_samples_reject_bad_arrays() -> None:
    with pytest.raises(DatasetError, match="uint8"):
        ImageSamples([np.zeros((4, 4), np.float32)], [0])[0]


def test_with_transform_subset_and_task_transforms() -> None:
    samples = ImageSamples([np.full((2, 2), i, np.uint8) for i in range(4)], [0, 1, 0, 1])
    sized = samples.with_transform(lambda im: im.size)
    assert sized.images is samples.images and samples.transform is None
    assert sized[1] == ((2, 2), 1)
    sub = sized.subset([3, 0])
    assert sub.labels == [1, 0] and sub[0] == ((2, 2), 1)


# ---------------------------------------------------------------- folders


def test_folder_names_labels_and_stratified_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"golden_retriever": 10, "cat": 10, "zebra": 5})
    task = load_task(str(root), seed=3)
    assert task.name == "ds"
    assert task.classnames == ["cat", "golden retriever", "zebra"]  # sorted folder order
    assert len(task.train) + len(task.test) == 25
    assert sorted(set(task.test.labels)) == [0, 1, 2] and task.test.labels.count(0) == 2
    assert not set(task.train.images) & set(task.test.images)
    for path, label in zip(task.train.images, task.train.labels):
        assert Path(path).parent.name == ["cat", "golden_retriever", "zebra"][label]


def test_split_is_deterministic_and_seeded(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"a": 12, "b": 12})
    first, again, other = (load_task(str(root), seed=s) for s in (0, 0, 1))
    assert first.test.images == again.test.images and first.train.images == again.train.images
    assert first.test.images != other.test.images


def test_split_per_class_keeps_both_sides() -> None:
    train, test = split_per_class([0, 0, 1, 1, 1, 2], test_fraction=0.5, seed=0)
    assert sorted(train + test) == list(range(6)) and not set(train) & set(test)
    assert {0, 1} <= {[0, 0, 1, 1, 1, 2][i] for i in test}
    assert 5 in train  # a class with one item stays in train


def test_caps_per_class(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"a": 20, "b": 20})
    task = load_task(str(root), max_train_per_class=3, max_test_per_class=2)
    assert task.train.labels.count(0) == 3 and task.test.labels.count(1) == 2


def test_classes_json_maps_folder_names(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"n01": 3, "n02": 3})
    (root / "classes.json").write_text(json.dumps({"n01": "tabby cat", "n02": "sports car"}))
    assert load_task(str(root)).classnames == ["tabby cat", "sports car"]


@pytest.mark.parametrize(
    "content, match",
    [("{not json", "not valid JSON"), ('["a"]', "JSON object"), ('{"n09": "x"}', "do not exist"),
     ('{"n01": "same", "n02": "Same"}', "both become class")],
)
def test_bad_classes_json(tmp_path: Path, content: str, match: str) -> None:
    root = make_tree(tmp_path / "ds", {"n01": 2, "n02": 2})
    (root / "classes.json").write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_task(str(root))


def test_train_test_split_layout(tmp_path: Path) -> None:
    make_tree(tmp_path / "ds" / "train", {"a": 4, "b": 3})
    make_tree(tmp_path / "ds" / "test", {"a": 2, "b": 1})
    task = load_task(str(tmp_path / "ds"))
    assert (len(task.train), len(task.test)) == (7, 3)
    assert all("/test/" in p for p in task.test.images) and task.test.labels == [0, 0, 1]


def test_split_layout_errors(tmp_path: Path) -> None:
    make_tree(tmp_path / "only" / "train", {"a": 2, "b": 2})
    with pytest.raises(DatasetError, match="no test/"):
        load_task(str(tmp_path / "only"))
    make_tree(tmp_path / "extra" / "train", {"a": 2, "b": 2})
    make_tree(tmp_path / "extra" / "test", {"a": 1, "c": 1})
    with pytest.raises(DatasetError, match=r"classes \['c'\]"):
        load_task(str(tmp_path / "extra"))


def test_hidden_files_are_ignored(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"a": 2, "b": 2})
    (root / ".DS_Store").write_bytes(b"\0junk")
    (root / "a" / ".DS_Store").write_bytes(b"\0junk")
    (root / "__MACOSX").mkdir()
    assert validate_image_folder(root).folders == ["a", "b"]


def test_non_image_file_is_named(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"a": 2, "b": 2})
    (root / "b" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"notes\.txt is not a readable PNG/JPEG/WEBP/BMP/GIF image"):
        load_task(str(root))


def test_loose_file_at_top_is_rejected(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"a": 2, "b": 2})
    (root / "stray.png").write_bytes(png_bytes())
    with pytest.raises(DatasetError, match="outside any class folder"):
        load_task(str(root))


def test_one_class_and_empty_class(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="at least 2 classes"):
        load_task(str(make_tree(tmp_path / "one", {"a": 3})))
    root = make_tree(tmp_path / "empty", {"a": 2, "b": 2})
    (root / "c").mkdir()
    with pytest.raises(DatasetError, match="has no images"):
        load_task(str(root))


def test_pixel_and_file_limits_on_folders(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"a": 2, "b": 2})
    Image.new("RGB", (101, 100)).save(root / "a" / "huge.png")
    with pytest.raises(DatasetError, match=r"huge\.png is 101x100 pixels"):
        validate_image_folder(root, SMALL)
    with pytest.raises(DatasetError, match="more than the limit of 3"):
        validate_image_folder(root, ArchiveLimits(max_files=3))


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"a": 2, "b": 2})
    (root / "a" / "broken.png").write_bytes(png_bytes()[:40])
    with pytest.raises(DatasetError, match=r"broken\.png"):
        load_task(str(root))


def test_unknown_source_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="built-in name"):
        load_task("no-such-task")
    root = make_tree(tmp_path / "ds", {"a": 2, "b": 2})
    for kwargs in ({"seed": -1}, {"test_fraction": 1.0}, {"max_train_per_class": 0}):
        with pytest.raises(DatasetError):
            load_task(str(root), **kwargs)


# ---------------------------------------------------------------- archives


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tgz", "tar"])
def test_archive_with_wrapping_folder_loads(tmp_path: Path, kind: str) -> None:
    entries = tree_entries({"red_fox": 5, "owl": 5}, prefix="my_dataset/")
    archive = tmp_path / f"pets.{kind}"
    zip_of(archive, entries) if kind == "zip" else tar_of(archive, entries, "w" if kind == "tar" else "w:gz")
    work = tmp_path / "work"
    work.mkdir()
    task = load_task(str(archive), work_dir=work)
    assert task.name == "pets" and task.classnames == ["owl", "red fox"]
    assert len(task.train) + len(task.test) == 10
    assert all(Path(p).is_relative_to(work) for p in task.train.images)
    assert load_task(str(archive), work_dir=work).classnames == task.classnames  # a second extraction coexists


def test_archive_with_split_layout_and_classes_json(tmp_path: Path) -> None:
    entries = {**tree_entries({"a": 3, "b": 3}, "train/"), **tree_entries({"a": 1, "b": 1}, "test/"),
               "classes.json": json.dumps({"a": "apple", "b": "banana"}).encode()}
    task = load_task(str(zip_of(tmp_path / "fruit.zip", entries)), work_dir=tmp_path)
    assert task.classnames == ["apple", "banana"] and (len(task.train), len(task.test)) == (6, 2)


def test_extract_ignores_macos_metadata(tmp_path: Path) -> None:
    entries = {**tree_entries({"a": 2, "b": 2}, "ds/"), "__MACOSX/ds/._a": b"\0\5junk", "ds/.DS_Store": b"x"}
    assert load_task(str(zip_of(tmp_path / "mac.zip", entries)), work_dir=tmp_path).classnames == ["a", "b"]


def _assert_rejected(archive: Path, dest: Path, match: str, limits: ArchiveLimits = SMALL) -> None:
    with pytest.raises(DatasetError, match=match):
        safe_extract(archive, dest, limits)
    assert not any(dest.iterdir()), "a failed extraction must leave nothing behind"
    assert not (dest.parent / "evil.png").exists()


def test_zip_slip_and_absolute_paths(tmp_path: Path) -> None:
    good = tree_entries({"a": 1}, "ds/")
    slip = zip_of(tmp_path / "slip.zip", {**good, "ds/../../evil.png": png_bytes()})
    _assert_rejected(slip, tmp_path / "o1", r"'\.\.'")
    _assert_rejected(zip_of(tmp_path / "abs.zip", {**good, "/tmp/evil.png": png_bytes()}), tmp_path / "o2", "absolute")
    _assert_rejected(tar_of(tmp_path / "slip.tgz", {**good, "../evil.png": png_bytes()}), tmp_path / "o3", r"'\.\.'")
    _assert_rejected(tar_of(tmp_path / "abs.tgz", {"/etc/evil.png": png_bytes()}), tmp_path / "o4", "absolute")
    _assert_rejected(zip_of(tmp_path / "win.zip", {"C:\\evil.png": png_bytes()}), tmp_path / "o5", "absolute")


def _tar_with(path: Path, member: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        tf.addfile(tarfile.TarInfo("ds/a/0.png"), io.BytesIO(b""))
        tf.addfile(member)
    return path


@pytest.mark.parametrize("kind, match", [(tarfile.SYMTYPE, "is a link"), (tarfile.LNKTYPE, "is a link"),
                                         (tarfile.CHRTYPE, "special file"), (tarfile.FIFOTYPE, "special file")])
def test_tar_links_and_devices(tmp_path: Path, kind: bytes, match: str) -> None:
    member = tarfile.TarInfo("ds/a/link.png")
    member.type, member.linkname = kind, "/etc/passwd"
    _assert_rejected(_tar_with(tmp_path / "x.tgz", member), tmp_path / "out", match)


def test_zip_symlink_entry(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ds/a/0.png", png_bytes())
        info = zipfile.ZipInfo("ds/a/link.png")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    _assert_rejected(archive, tmp_path / "out", "symlink")


def test_zip_bomb_rejected_from_declared_size(tmp_path: Path) -> None:
    archive = zip_of(tmp_path / "bomb.zip", {"ds/a/big.png": b"\0" * 90_000, "ds/b/big.png": b"\0" * 90_000,
                                             "ds/c/big.png": b"\0" * 90_000})
    assert archive.stat().st_size < 5_000  # highly compressible
    _assert_rejected(archive, tmp_path / "out", "more than 200000 bytes")
    _assert_rejected(archive, tmp_path / "out2", "larger than 1000 bytes", ArchiveLimits(max_file_bytes=1000))


def test_tar_bomb_rejected(tmp_path: Path) -> None:
    archive = tar_of(tmp_path / "bomb.tgz", {f"ds/a/{i}.png": b"\0" * 80_000 for i in range(3)})
    _assert_rejected(archive, tmp_path / "out", "more than 200000 bytes")


def test_lying_size_header_does_not_get_through(tmp_path: Path) -> None:
    archive = zip_of(tmp_path / "liar.zip", {"ds/a/big.png": b"\0" * 50_000})
    data = bytearray(archive.read_bytes())
    small = (100).to_bytes(4, "little")
    data[22:26] = small  # local header: uncompressed size
    cd = data.index(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = small  # central directory: uncompressed size
    archive.write_bytes(bytes(data))
    _assert_rejected(archive, tmp_path / "out", "corrupt")


def test_actual_bytes_are_counted_while_copying(tmp_path: Path) -> None:
    budget = _Budget(ArchiveLimits(max_file_bytes=10_000))
    with pytest.raises(DatasetError, match="larger than 10000 bytes"):
        _copy_counted(io.BytesIO(b"\0" * 20_000), tmp_path / "x", "x", budget)
    budget = _Budget(ArchiveLimits(max_total_bytes=15_000))
    _copy_counted(io.BytesIO(b"\0" * 10_000), tmp_path / "y", "y", budget)
    with pytest.raises(DatasetError, match="more than 15000 bytes"):
        _copy_counted(io.BytesIO(b"\0" * 10_000), tmp_path / "z", "z", budget)


def test_too_many_files(tmp_path: Path) -> None:
    entries = {f"ds/a/{i}.png": b"" for i in range(51)}
    _assert_rejected(zip_of(tmp_path / "many.zip", entries), tmp_path / "o1", "declares 51 entries")
    _assert_rejected(tar_of(tmp_path / "many.tgz", entries), tmp_path / "o2", "more than 50 entries")


def folders_zip(path: Path, folders: int, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(folders):
            zf.writestr(zipfile.ZipInfo(f"ds/empty{i}/"), b"")
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_folders_count_toward_the_entry_limit(tmp_path: Path) -> None:
    files = tree_entries({"a": 2, "b": 2}, prefix="ds/")
    _assert_rejected(folders_zip(tmp_path / "dirs.zip", 47, files), tmp_path / "o1", "declares 51 entries")
    with tarfile.open(tmp_path / "dirs.tar", "w") as tf:
        for i in range(51):
            info = tarfile.TarInfo(f"ds/empty{i}")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
    _assert_rejected(tmp_path / "dirs.tar", tmp_path / "o2", "more than 50 entries")
    assert safe_extract(folders_zip(tmp_path / "fits.zip", 40, files), tmp_path / "o3", SMALL).is_dir()


def test_a_zip_of_many_folders_is_refused_from_its_end_record(tmp_path: Path, monkeypatch) -> None:
    """30,000 empty folders (over the default 20,000 entries): refused before zipfile parses the
    central directory, so in milliseconds whatever the entry count."""
    archive = folders_zip(tmp_path / "folders.zip", 30_000, {})
    monkeypatch.setattr(zipfile, "ZipFile", None)  # constructing one would fail the test
    with pytest.raises(DatasetError, match="declares 30000 entries"):
        safe_extract(archive, tmp_path / "out")


def test_an_oversized_central_directory_is_refused(tmp_path: Path) -> None:
    """Three entries whose 20 kB comments make a 60 kB central directory, over SMALL's 50 x 512 bytes."""
    archive = tmp_path / "comments.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in tree_entries({"a": 2, "b": 1}, prefix="ds/").items():
            info = zipfile.ZipInfo(name)
            info.comment = b"x" * 20_000
            zf.writestr(info, data)
    _assert_rejected(archive, tmp_path / "out", "central directory is")


def test_dataset_images_are_an_allow_list_of_formats(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"a": 2, "b": 2})
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "a" / "odd.tiff", format="TIFF")
    with pytest.raises(DatasetError, match=r"odd\.tiff is not a readable PNG/JPEG/WEBP/BMP/GIF image"):
        validate_image_folder(root)
    (root / "a" / "odd.tiff").unlink()
    for fmt in ("JPEG", "WEBP", "BMP", "GIF"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "b" / f"ok.{fmt.lower()}", format=fmt)
    assert len(validate_image_folder(root).splits["all"]["b"]) == 6


def test_corrupt_unknown_and_empty_archives(tmp_path: Path) -> None:
    good = zip_of(tmp_path / "good.zip", tree_entries({"a": 3, "b": 3}))
    (tmp_path / "trunc.zip").write_bytes(good.read_bytes()[:-30])
    _assert_rejected(tmp_path / "trunc.zip", tmp_path / "o1", "corrupt or truncated archive")
    tgz = tar_of(tmp_path / "good.tgz", tree_entries({"a": 3, "b": 3}))
    (tmp_path / "trunc.tgz").write_bytes(tgz.read_bytes()[:-100])
    _assert_rejected(tmp_path / "trunc.tgz", tmp_path / "o2", "corrupt")
    (tmp_path / "notes.txt").write_text("just text")
    _assert_rejected(tmp_path / "notes.txt", tmp_path / "o3", "not a zip or tar archive")
    with pytest.raises(ArchiveTypeError):  # not an archive at all: the service answers 415, not 400
        safe_extract(tmp_path / "notes.txt", tmp_path / "o5")
    _assert_rejected(zip_of(tmp_path / "empty.zip", {}), tmp_path / "o4", "contains no files")
    with tarfile.open(tmp_path / "dirs.tar", "w") as tf:
        info = tarfile.TarInfo("ds")
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
    _assert_rejected(tmp_path / "dirs.tar", tmp_path / "o5", "contains no files")


def test_archive_content_errors_surface_from_load_task(tmp_path: Path) -> None:
    one = zip_of(tmp_path / "one.zip", tree_entries({"a": 3}, "ds/"))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(DatasetError, match="at least 2 classes"):
        load_task(one, work_dir=work)
    assert not any(work.iterdir()), "a rejected upload leaves no extracted files"
    text = zip_of(tmp_path / "text.zip", {**tree_entries({"a": 2, "b": 2}), "b/readme.md": b"# hi"})
    with pytest.raises(DatasetError, match=r"readme\.md"):
        load_task(str(text), work_dir=tmp_path)
    buf = io.BytesIO()
    Image.new("RGB", (120, 100)).save(buf, format="PNG")
    huge = zip_of(tmp_path / "huge.zip", {**tree_entries({"a": 2, "b": 2}), "a/huge.png": buf.getvalue()})
    with pytest.raises(DatasetError, match="pixel limit"):
        load_task(str(huge), work_dir=tmp_path, limits=SMALL)


def test_duplicate_entries_and_non_empty_dest(tmp_path: Path) -> None:
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("ds/a/0.png", png_bytes())
        zf.writestr("ds/a/0.png", png_bytes())
    _assert_rejected(archive, tmp_path / "out", "appears twice")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        safe_extract(zip_of(tmp_path / "ok.zip", tree_entries({"a": 1})), busy)
    assert (busy / "keep.txt").read_text() == "mine"
