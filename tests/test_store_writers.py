"""One writer at a time, and atomic writes on a real object store.

Run on a local folder and on `s3://` (SeaweedFS, tests/seaweedfs.py): the writer lease and its
fencing token, version numbers claimed with an exclusive create, stale staging discarded only
once its lease has expired, and (S3) each record and the pointer written with one PUT, never a
temp object plus a copy."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from seaweedfs import RequestLog
from service.store import CLAIM, STATE_FILES, LeaseLost, ModelStore, StoreLease, version_dir
from test_store import fake_state

TTL_S = 30.0


class Clock:
    """Wall and monotonic time that move only when the test says so: lease expiry without sleeping."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    monotonic = time

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    from service.store import lease, model_store

    fake = Clock()
    monkeypatch.setattr(lease, "time", fake)
    monkeypatch.setattr(model_store, "time", fake)
    return fake


@pytest.fixture(params=["path", "s3"])
def location(request, tmp_path) -> str:
    return request.getfixturevalue("s3_store_uri") if request.param == "s3" else str(tmp_path / "store")


def writer(location: str, name: str) -> tuple[ModelStore, StoreLease]:
    """A service's view of the store: its own ModelStore with its own lease attached."""
    store = ModelStore.open(location)
    store.lease = StoreLease(store, holder=name, ttl_s=TTL_S)
    return store, store.lease


def test_one_writer_at_a_time_with_a_fencing_token(location, clock, tmp_path):
    old, old_lease = writer(location, "old")
    new, new_lease = writer(location, "new")
    assert old_lease.try_acquire() and old_lease.token == 1
    assert not new_lease.try_acquire() and new_lease.token is None, "the lease is held: the second waits"
    assert old.publish_version(fake_state(tmp_path / "a", "a"), {}) == 1
    old.set_active(1, "base model")
    with pytest.raises(LeaseLost):
        new.publish_version(fake_state(tmp_path / "b", "b"), {})
    with pytest.raises(LeaseLost):
        new.set_active(1, "standby must not write")
    with pytest.raises(LeaseLost):
        new.save_job({"task_id": "t1", "seq": 1, "status": "queued"})
    assert old.versions() == [1] and not old.exists(version_dir(2)) and old.jobs() == []
    assert old_lease.renew() and new_lease.current()["holder"] == "old"
    clock.advance(TTL_S * 2 / 3)  # the old holder stops renewing (a crash, a long pause)
    with pytest.raises(LeaseLost):  # past its own deadline it writes nothing, before anyone took over
        old.set_active(1, "too late")
    assert not new_lease.try_acquire(), "the old record has not expired yet"
    clock.advance(TTL_S / 3)
    assert new_lease.try_acquire() and new_lease.token == 2, "the fencing token only grows"
    assert not old_lease.renew() and not old_lease.try_acquire()
    assert new.publish_version(fake_state(tmp_path / "b", "b"), {"parent": 1}) == 2
    new.set_active(2, "task b")
    assert new.versions() == [1, 2] and new.active() == 2
    assert (new.fetch_version(1, tmp_path / "c1") / "weights.safetensors").read_text() == "a:weights.safetensors"
    assert (new.fetch_version(2, tmp_path / "c2") / "weights.safetensors").read_text() == "b:weights.safetensors"
    new_lease.release()
    assert old_lease.try_acquire() and old_lease.token == 3, "a released lease is free at once"


def test_only_stale_staging_of_an_expired_lease_is_discarded(location, clock, tmp_path):
    first, first_lease = writer(location, "first")
    assert first_lease.try_acquire()
    first.publish_version(fake_state(tmp_path / "a", "a"), {})
    staging = first._claim_version()  # a publish in progress: claimed, files coming, no manifest yet
    first.put_file(fake_state(tmp_path / "b", "b") / "weights.safetensors", f"{version_dir(staging)}/weights.safetensors")
    assert first.discard_incomplete() == [] and first.exists(f"{version_dir(staging)}/{CLAIM}")
    second, second_lease = writer(location, "second")
    assert not second_lease.try_acquire()
    clock.advance(TTL_S)  # the first writer died: its lease expires
    assert second_lease.try_acquire()
    assert version_dir(staging) in second.discard_incomplete()
    assert not second.exists(version_dir(staging)) and second.versions() == [1]
    assert second.publish_version(fake_state(tmp_path / "c", "c"), {}) == staging


def test_racing_publishers_never_share_a_version_number(location, tmp_path):
    """Even without a lease, the exclusive create of each claim gives every publish its own number."""
    stores = [ModelStore.open(location) for _ in range(3)]
    published: dict[int, str] = {}
    errors: list[BaseException] = []

    def publish(store: ModelStore, tag: str) -> None:
        try:
            for i in range(2):
                published[store.publish_version(fake_state(tmp_path / f"{tag}{i}", f"{tag}{i}"), {"tag": f"{tag}{i}"})] = f"{tag}{i}"
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(store, tag)) for store, tag in zip(stores, "xyz")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sorted(published) == list(range(1, 7)) == stores[0].versions()
    for version, tag in published.items():  # nothing overwritten: each version holds its own publish
        assert stores[0].manifest(version)["tag"] == tag
        folder = stores[0].fetch_version(version, tmp_path / "cache")
        assert (folder / "state.json").read_text() == f"{tag}:state.json"


def test_records_and_pointer_are_one_put_each_on_s3(seaweedfs, monkeypatch, tmp_path):
    """On an object store a record is replaced by ONE PUT: no temp object, no copy, no delete."""
    uri = seaweedfs.uri()
    with RequestLog(seaweedfs.endpoint) as log:
        for name, value in {**seaweedfs.env(), "AWS_ENDPOINT_URL": log.endpoint}.items():
            monkeypatch.setenv(name, value)
        store = ModelStore.open(uri)
        prefix = "/" + uri.removeprefix("s3://")
        log.requests.clear()
        store.publish_version(fake_state(tmp_path / "a", "a"), {})
        publish_writes = log.writes()
        log.requests.clear()
        store.set_active(1, "base model")
        pointer_writes = log.writes()
        log.requests.clear()
        store.save_job({"task_id": "t1", "seq": 1, "status": "queued"})
        job_writes = log.writes()
    assert pointer_writes == [("PUT", f"{prefix}/active.json", "", False)]
    assert job_writes == [("PUT", f"{prefix}/jobs/t1.json", "", False)]
    v1 = f"{prefix}/{version_dir(1)}"
    assert publish_writes[0] == ("PUT", f"{v1}/{CLAIM}", "", False)
    assert publish_writes[-1] == ("PUT", f"{v1}/manifest.json", "", False), "the commit is one PUT, written last"
    # The state files go as pyarrow streams them (an upload that appears whole when completed), each
    # straight to its final name: nothing is copied, deleted or written under another name.
    assert {path for _, path, _, _ in publish_writes} == {f"{v1}/{name}" for name in
                                                           (CLAIM, *STATE_FILES, "manifest.json")}
    assert not [w for w in publish_writes if w[0] == "DELETE" or w[3]]
    listed = [Path(i.path).name for i in seaweedfs.filesystem().get_file_info(
        __import__("pyarrow.fs").fs.FileSelector(uri.removeprefix("s3://"), recursive=True))]
    assert not [name for name in listed if "tmp" in name], listed


def test_a_restarted_service_takes_over_from_its_dead_predecessor_at_once(tmp_path):
    """A holder on this machine whose process has exited (the service was killed and restarted)
    is not waited out; a live holder still is."""
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    store = ModelStore.open(str(tmp_path / "store"))
    before = StoreLease(store, holder=f"{socket.gethostname()}-{dead.pid}-0000abcd", ttl_s=TTL_S)
    assert before.try_acquire()
    assert StoreLease(store, ttl_s=TTL_S).try_acquire(), "its process is gone: no need to wait 30 s"
    assert not StoreLease(store, ttl_s=TTL_S).try_acquire(), "the new holder is alive (this process)"
