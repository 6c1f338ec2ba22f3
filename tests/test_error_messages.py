"""What users read never shows the server's folders: dataset errors name files inside the archive,
messages are stripped of server paths, and a failed job keeps a short reason while the service log
keeps the detail."""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from gnsp_core.data.archives import ArchiveLimits
from gnsp_core.errors import ArchiveTypeError, DatasetError
from service.api.uploads import validate_dataset
from service.errors import error_message, hide_dirs, http_status, redact_paths, user_reason
from test_jobs import FakeRunner, make_queue, store, submit, until  # noqa: F401  (store is a fixture)


def png(size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 20, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(tmp: Path, entries: dict[str, bytes]) -> Path:
    archive = tmp / "upload"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return archive


def dataset_error(tmp: Path, entries: dict[str, bytes], limits: ArchiveLimits = ArchiveLimits()) -> str:
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    with pytest.raises(DatasetError) as caught:
        validate_dataset(upload(tmp, entries), limits, str(scratch))
    message = str(caught.value)
    assert str(tmp) not in message and "gnsp-check-" not in message, message
    return message


@pytest.mark.parametrize("entries, names", [
    ({"pets/cat/0.png": png(), "pets/dog/0.png": b"not an image"}, "dog/0.png"),
    ({"cat/0.png": png(), "dog/big.png": png(64)}, "dog/big.png"),
    ({"cat/0.png": png(), "dog/0.png": png(), "notes.txt": b"x"}, "notes.txt is a file outside"),
    ({"cat/0.png": png(), "cat/.hidden/x.png": png(), "dog/.DS_Store": b"x"}, "class folder dog/ has no images"),
    ({"ds/train/cat/0.png": png(), "ds/train/dog/0.png": png(), "ds/test/cat/0.png": png(), "ds/extra/x.png": png()},
     "unexpected entries ['extra'] beside train/ and test/ in ds/"),
    ({"ds/train/cat/0.png": png(), "ds/train/dog/0.png": png()}, "no test/ folder in ds/"),
    ({"only/0.png": png()}, "at the top of the dataset"),
])
def test_dataset_errors_name_the_users_own_paths(tmp_path, entries, names):
    limits = ArchiveLimits(max_image_pixels=1000)
    assert names in dataset_error(tmp_path, entries, limits)


def test_a_file_that_is_no_archive_is_415_and_a_corrupt_one_400(tmp_path):
    (tmp_path / "photo").write_bytes(png())
    with pytest.raises(ArchiveTypeError) as caught:
        validate_dataset(tmp_path / "photo", ArchiveLimits(), str(tmp_path))
    assert http_status(caught.value) == 415 and caught.value.code == "unsupported_media_type"
    (tmp_path / "broken").write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(DatasetError) as caught:
        validate_dataset(tmp_path / "broken", ArchiveLimits(), str(tmp_path))
    assert not isinstance(caught.value, ArchiveTypeError) and http_status(caught.value) == 400


def test_server_folders_are_shortened_in_messages(tmp_path):
    import tempfile

    hide_dirs(str(tmp_path / "srv-store"), "s3://bucket/gnsp", None)
    message = redact_paths(f"cannot read {tmp_path}/srv-store/jobs/a.json; see POST /v1/models/3/activate "
                           f"and {tempfile.gettempdir()}/gnsp-upload-x/upload, not /tmpfoo")
    assert message == ("cannot read …/a.json; see POST /v1/models/3/activate and …/upload, not /tmpfoo")
    assert error_message(DatasetError(f"{tmp_path}/srv-store is gone")) == "…/srv-store is gone"


def test_a_failed_job_keeps_a_short_reason_and_the_log_the_detail(store, tmp_path, caplog):  # noqa: F811
    runner = FakeRunner(store, tmp_path)
    runner.error = RuntimeError(f"disk on fire at {tmp_path}/store/jobs/task-a.json")
    queue = make_queue(store, runner)
    with caplog.at_level(logging.WARNING):
        task_id = submit(queue, store, "task-a", tmp_path)["task_id"]
        record = until(lambda: queue.view(task_id)["status"] == "failed" and queue.view(task_id))
    queue.stop()
    assert record["error"] == "internal error (RuntimeError); see the service log"
    assert any("disk on fire" in r.getMessage() or "disk on fire" in (r.exc_text or "") for r in caplog.records)


def test_a_user_error_keeps_its_message_without_server_paths(store, tmp_path):  # noqa: F811
    runner = FakeRunner(store, tmp_path)
    runner.error = DatasetError(f"{tmp_path}/work/extract/cat is not a readable image; re-save it")
    queue = make_queue(store, runner)
    task_id = submit(queue, store, "task-a", tmp_path)["task_id"]
    record = until(lambda: queue.view(task_id)["status"] == "failed" and queue.view(task_id))
    queue.stop()
    assert record["error"] == "…/cat is not a readable image; re-save it"
    assert user_reason(KeyError("x")) == "internal error (KeyError); see the service log"
