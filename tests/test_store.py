"""The versioned store: immutable versions, an atomic pointer with history, job records, crash leftovers.

Run on a local folder, a file:// URI, a SubTreeFileSystem, an in-memory pyarrow filesystem, and a
real object store: `s3://` on SeaweedFS (tests/seaweedfs.py), addressed as users address S3."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import pytest

from service.errors import UnknownVersionError
from service.store import ACTIVE, BLOBS, MANIFEST, SHARED_DIR, STATE_FILES, ModelStore, version_dir


def fake_state(folder: Path, tag: str) -> Path:
    """A stand-in for a ContinualState folder: the store only moves its files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in STATE_FILES:
        (folder / name).write_text(f"{tag}:{name}")
    return folder


def memory_store() -> ModelStore:
    """A store on a filesystem with no local path, like s3:// (pyarrow over fsspec's memory fs)."""
    memory = fsspec.filesystem("memory")
    memory.store.clear()
    memory.pseudo_dirs.clear()
    return ModelStore(pafs.PyFileSystem(pafs.FSSpecHandler(memory)), "/gnsp-store", "memory://gnsp-store")


@pytest.fixture(params=["path", "file-uri", "subtree", "memory", "s3"])
def store(request, tmp_path) -> ModelStore:
    if request.param == "s3":
        return ModelStore.open(request.getfixturevalue("s3_store_uri"))
    if request.param == "path":
        return ModelStore.open(str(tmp_path / "store"))
    if request.param == "file-uri":
        return ModelStore.open(f"file://{tmp_path}/store")
    if request.param == "subtree":
        (tmp_path / "base").mkdir()
        return ModelStore(pafs.SubTreeFileSystem(str(tmp_path / "base"), pafs.LocalFileSystem()), "store")
    return memory_store()


def test_versions_are_numbered_immutable_and_fetchable(store, tmp_path):
    assert store.versions() == [] and store.active() is None
    assert store.publish_version(fake_state(tmp_path / "a", "a"), {"tasks": []}) == 1
    assert store.publish_version(fake_state(tmp_path / "b", "b"), {"tasks": ["rgb"], "parent": 1}) == 2
    assert store.versions() == [1, 2] and store.has_version(2) and not store.has_version(3)
    manifest = store.manifest(2)
    assert manifest["version"] == 2 and manifest["parent"] == 1 and manifest["tasks"] == ["rgb"]
    folder = store.fetch_version(2, tmp_path / "cache")
    assert (folder / "weights.safetensors").read_text() == "b:weights.safetensors"
    assert store.fetch_version(2, tmp_path / "cache") == folder  # cached, not fetched again
    with pytest.raises(UnknownVersionError):
        store.manifest(7)
    assert not store.has_version(0) and not store.has_version(-3)


def test_pointer_moves_atomically_with_history(store, tmp_path):
    for tag in "abc":
        store.publish_version(fake_state(tmp_path / tag, tag), {})
    store.set_active(1, "base model")
    store.set_active(3, "task x")
    store.set_active(2, "rollback")
    pointer = store.pointer()
    assert pointer["version"] == 2 == store.active()
    assert [(h["version"], h["previous"], h["reason"]) for h in pointer["history"]] == [
        (1, None, "base model"), (3, 1, "task x"), (2, 3, "rollback")]
    with pytest.raises(UnknownVersionError):
        store.set_active(9, "nope")
    assert store.active() == 2


def test_crash_leftovers_are_ignored_then_discarded(store, tmp_path):
    store.publish_version(fake_state(tmp_path / "a", "a"), {})
    store.set_active(1, "base model")
    # A crash while publishing version 2 (files written, manifest not) and while replacing the pointer.
    store.put_file(fake_state(tmp_path / "b", "b") / "weights.safetensors", f"{version_dir(2)}/weights.safetensors")
    with store.fs.open_output_stream(store.path(f"{ACTIVE}.tmp-dead")) as stream:
        stream.write(b'{"version": 2, "hist')
    store.fs.create_dir(store.path("jobs"))
    with store.fs.open_output_stream(store.path("jobs/t1.json.tmp-dead")) as stream:
        stream.write(b"{")
    assert store.versions() == [1] and store.active() == 1 and store.jobs() == []
    removed = store.discard_incomplete()
    assert version_dir(2) in removed and len(removed) == 3
    assert store.publish_version(fake_state(tmp_path / "c", "c"), {}) == 2
    assert store.manifest(2)["version"] == 2


def test_job_records_and_uploads(store, tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK fake")
    for seq, task_id in enumerate(["task-b", "task-a"], start=1):
        store.save_job({"task_id": task_id, "seq": seq, "status": "queued"})
    store.save_job({"task_id": "task-b", "seq": 1, "status": "running"})
    assert [(r["task_id"], r["status"]) for r in store.jobs()] == [("task-b", "running"), ("task-a", "queued")]
    assert {r["task_id"]: r["seq"] for r in store.jobs()}["task-a"] == 2
    with pytest.raises(ValueError):
        store.save_job({"task_id": "../etc/passwd", "seq": 3, "status": "queued"})
    rel = store.put_upload("task-a", archive, "dataset.zip")
    assert store.upload_ids() == ["task-a"]
    assert store.fetch_upload(rel, tmp_path / "scratch").read_bytes() == b"PK fake"
    store.delete_job_files("task-a")
    assert store.upload_ids() == []
    with pytest.raises(ValueError):
        store.save_job({"task_id": "../x", "seq": 3})


def test_local_and_remote_stores_report_where_things_live(tmp_path):
    local = ModelStore.open(str(tmp_path / "rel" / ".." / "store"))
    assert local.local_path() == tmp_path / "store" and local.run_storage() == str(tmp_path / "store" / "runs")
    remote = memory_store()
    assert remote.local_path() is None and remote.run_storage() == "memory://gnsp-store/runs"


def test_store_written_files_are_plain_json(tmp_path):
    store = ModelStore.open(str(tmp_path / "store"))
    store.publish_version(fake_state(tmp_path / "a", "a"), {"metrics": {"heldout_accuracy": 50.0}})
    store.set_active(1, "base model")
    manifest = json.loads((tmp_path / "store" / version_dir(1) / MANIFEST).read_text())
    assert manifest["metrics"] == {"heldout_accuracy": 50.0}
    assert json.loads((tmp_path / "store" / ACTIVE).read_text())["version"] == 1
    assert not [p for p in (tmp_path / "store").rglob("*") if ".tmp-" in p.name]


def state_with_shared(folder: Path, tag: str, shared: dict[str, str]) -> Path:
    """A state folder whose `stats/` holds content-addressed files (name -> content)."""
    fake_state(folder, tag)
    (folder / SHARED_DIR).mkdir()
    for name, content in shared.items():
        (folder / SHARED_DIR / name).write_text(content)
    return folder


def test_versions_share_unchanged_statistics_and_stay_readable_alone(store, tmp_path):
    store.publish_version(state_with_shared(tmp_path / "a", "a", {"h1.safetensors": "one", "h2.safetensors": "two"}), {})
    store.publish_version(state_with_shared(tmp_path / "b", "b", {"h1.safetensors": "one", "h3.safetensors": "three"}), {})
    assert store.manifest(2)["shared"] == ["stats/h1.safetensors", "stats/h3.safetensors"]
    assert sorted(i.base_name for i in store.listdir(BLOBS)) == ["h1.safetensors", "h2.safetensors", "h3.safetensors"]
    assert store.blob_bytes() == len("one") + len("two") + len("three"), "h1 is kept once for both versions"
    local = store.local_path(version_dir(2))
    if local is not None:  # a local version folder is complete by itself, through hard links to the blobs
        assert (local / "stats" / "h1.safetensors").samefile(store.local_path(f"{BLOBS}/h1.safetensors"))
    store.delete_dir(version_dir(1))  # even if the parent's folder goes, version 2 reads alone
    folder = store.fetch_version(2, tmp_path / "cache")
    assert (folder / "stats" / "h1.safetensors").read_text() == "one"
    assert (folder / "stats" / "h3.safetensors").read_text() == "three"
    removed = store.discard_incomplete()  # h2 is named by no committed version any more
    assert [Path(r).name for r in removed] == ["h2.safetensors"]
    assert sorted(i.base_name for i in store.listdir(BLOBS)) == ["h1.safetensors", "h3.safetensors"]


def test_a_torn_blob_upload_is_never_taken_for_the_blob(store, tmp_path):
    store.fs.create_dir(store.path(BLOBS))
    with store.fs.open_output_stream(store.path(f"{BLOBS}/h1.safetensors.tmp-dead")) as stream:
        stream.write(b"o")
    store.publish_version(state_with_shared(tmp_path / "a", "a", {"h1.safetensors": "one"}), {})
    assert (store.fetch_version(1, tmp_path / "cache") / "stats" / "h1.safetensors").read_text() == "one"
    assert [Path(r).name for r in store.discard_incomplete()] == ["h1.safetensors.tmp-dead"]


def test_versions_of_real_states_keep_unchanged_statistics_once(tiny, tmp_path):
    import torch

    from gnsp_core.projection import ProjectorStatistics
    from gnsp_core.state import ContinualState

    store = ModelStore.open(str(tmp_path / "store"))
    state = ContinualState.initial(tiny.model, tiny.spec)
    state.stats = ProjectorStatistics(storage="float32")
    x = torch.randn(40, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    state.stats.add_task({"visual.proj": x.T @ x, "visual.transformer.resblocks.0.mlp.c_fc": x.T @ x / 2})
    store.publish_version(state.save(tmp_path / "a"), {})
    one_version = store.blob_bytes()
    state.weights = {k: v + 1 if v.is_floating_point() else v for k, v in state.weights.items()}  # a task of another method
    store.publish_version(state.save(tmp_path / "b"), {})
    assert store.blob_bytes() == one_version > 0
    again = ContinualState.load(store.fetch_version(2, tmp_path / "cache"))
    assert again.stats.storage == "float32"
    assert all(torch.equal(again.stats.covariances[k], state.stats.covariances[k]) for k in state.stats.covariances)


def test_a_record_rewritten_while_it_is_read_is_never_read_torn(s3_store_uri):
    """On S3 pyarrow sizes an object when it opens it and fetches it after: a job record replaced in
    between would come back cut short or mixed. Every read sees one whole version or another."""
    from seaweedfs import reads_while_rewritten

    store = ModelStore.open(s3_store_uri)
    versions = [{"task_id": "t", "status": status, "note": "x" * (40 * i)}
                for i, status in enumerate(["queued", "running", "succeeded"])]
    seen = reads_while_rewritten(lambda record: store.write_json("jobs/t.json", record),
                                 lambda: store.read_json("jobs/t.json"), versions)
    assert all(record in versions for record in seen)
