"""What a training worker fetches by store address lands in its own scratch, from a local folder or S3."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow.fs as pafs

from gnsp_core.models import ModelSpec, load_model
from gnsp_core.state import ContinualState
from service.store import ModelStore
from service.training.stored import (StoredState, StoredUpload, StoredVersion, local_source, run_storage,
                                     scratch_root)

TINY = ModelSpec(name="tiny", seed=0)


def publish_tiny(store: ModelStore, tmp: Path) -> int:
    loaded = load_model(TINY)
    folder = ContinualState.initial(loaded.model, TINY).save(tmp / "state")
    return store.publish_version(folder, {"parent": None, "task_id": None, "tasks": [], "spec": TINY.to_dict()})


def test_a_worker_fetches_upload_and_version_from_s3_into_its_scratch(s3_store_uri, tmp_path):
    store = ModelStore.open(s3_store_uri)
    version = publish_tiny(store, tmp_path)
    archive = tmp_path / "rgb.zip"
    archive.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: its bytes are what must arrive
    rel = store.put_upload("task-1", archive, "rgb.zip")

    # The addresses cross to the worker pickled, as Ray ships a TrainJob; no path of this node is in them.
    upload, base = pickle.loads(pickle.dumps((StoredUpload(s3_store_uri, rel), StoredVersion(s3_store_uri, version))))
    scratch = tmp_path / "worker-scratch"
    fetched = Path(local_source(upload, scratch / "upload"))
    assert fetched.is_relative_to(scratch) and fetched.read_bytes() == archive.read_bytes()
    state_dir = Path(local_source(base, scratch / "base"))
    assert state_dir.is_relative_to(scratch)
    assert ContinualState.load(state_dir).spec == TINY
    assert local_source("digits", scratch) == "digits" and local_source(None, scratch) is None

    path, filesystem = run_storage(store)  # checkpoints go to the bucket, through the store's own filesystem
    assert isinstance(filesystem, pafs.S3FileSystem) and path == f"{s3_store_uri.removeprefix('s3://')}/runs"

    # A search trial's state: the final checkpoint of its task's run, addressed in the store, fetched whole.
    checkpoint = f"{store.path('tune/s/work/runs/t0')}/checkpoint_000002"
    for name in ("state.json", "stats/ab.safetensors"):
        with store.fs.open_output_stream(f"{checkpoint}/{name}") as stream:
            stream.write(name.encode())
    state = pickle.loads(pickle.dumps(StoredState.of_checkpoint(store, checkpoint)))
    assert state == StoredState(s3_store_uri, "tune/s/work/runs/t0/checkpoint_000002")
    folder = Path(local_source(state, scratch / "state"))
    assert folder.is_relative_to(scratch) and (folder / "stats" / "ab.safetensors").read_bytes() == b"stats/ab.safetensors"


def test_a_local_store_is_read_in_place_and_scratch_is_made_on_the_node(tmp_path):
    store = ModelStore.open(str(tmp_path / "store"))
    version = publish_tiny(store, tmp_path)
    assert run_storage(store) == (str(tmp_path / "store" / "runs"), None)
    fetched = StoredVersion(store.uri, version).fetch(tmp_path / "scratch")
    assert Path(fetched) == tmp_path / "store" / "models" / f"v{version:06d}"  # a shared folder: no copy
    checkpoint = tmp_path / "store" / "tune" / "s" / "work" / "runs" / "t0" / "checkpoint_000001"
    state = StoredState.of_checkpoint(store, str(checkpoint))
    assert state.rel == "tune/s/work/runs/t0/checkpoint_000001" and state.fetch(tmp_path / "scratch") == str(checkpoint)
    assert scratch_root(str(tmp_path / "node" / "scratch")) == str(tmp_path / "node" / "scratch")
    assert (tmp_path / "node" / "scratch").is_dir() and scratch_root(None) is None
