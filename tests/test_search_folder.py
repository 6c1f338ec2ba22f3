"""A search's folder in the store, on a local folder and on `s3://` (SeaweedFS): its request and
status round-trip, Ray gets a storage path on the store's own filesystem, it is removed whole, and a
file in it read while it is rewritten is read whole."""

from __future__ import annotations

import json
import pickle

import pyarrow.fs as pafs
import pytest

from gnsp_core.errors import ConfigError
from service.tuning.folder import SearchFolder
from service.tuning.report import read_results, write_status
from service.tuning.request import TuneRequest


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    return request.getfixturevalue("s3_store_uri") if request.param == "s3" else str(tmp_path / "store")


def test_a_search_folder_in_the_store_holds_the_request_status_and_ray_storage(location):
    request = TuneRequest(tasks=["digits"], out_dir="tune/tune-1", job_id="tune-1", store=location, base_version=1)
    assert request.out_dir == "tune/tune-1"  # a place in the store, not resolved against this node's disk
    folder = pickle.loads(pickle.dumps(request.folder()))  # as it reaches a trial on another node
    assert folder == SearchFolder(location, "tune/tune-1") and not folder.exists()

    request.save()
    request.save()  # the same request again: nothing to do
    assert TuneRequest.load(folder) == request
    assert read_results(folder) == {"status": "queued", "trials": [], "best": None}
    write_status(folder, "failed", "disk full")
    assert read_results(folder)["status"] == "failed" and read_results(folder)["error"] == "disk full"

    path, filesystem = folder.storage("ray")
    if location.startswith("s3://"):
        assert isinstance(filesystem, pafs.S3FileSystem) and folder.local_path is None
        assert path == f"{location.removeprefix('s3://')}/tune/tune-1/ray"
    else:
        assert filesystem is None and path == f"{location}/tune/tune-1/ray"
    folder.delete()
    assert not folder.exists() and folder.read_json("request.json") is None


def test_a_local_out_folder_is_a_search_folder_of_its_own(tmp_path):
    request = TuneRequest(tasks=["digits"], out_dir=str(tmp_path / "out"))
    request.save()
    assert (tmp_path / "out" / "request.json").is_file() and request.folder().local_path == tmp_path / "out"
    assert TuneRequest.load(tmp_path / "out") == request
    with pytest.raises(ConfigError, match="base_version"):
        TuneRequest(tasks=["digits"], out_dir=str(tmp_path / "x"), base_version=2)


def test_a_file_rewritten_while_it_is_polled_never_reads_torn(s3_store_uri):
    """On S3 a read is sized when the file is opened (HEAD) and fetched after (ranged GET): a file
    replaced in between comes back torn (cut short, or with bytes of neither version). The trials
    table is rewritten on every result while `GET /v1/tune/{job_id}` polls it, so reading it must
    see one whole version or another."""
    from seaweedfs import reads_while_rewritten

    folder = SearchFolder(s3_store_uri, "tune/tune-1")
    versions = [[{"trial": i, "note": "x" * (40 * (i % 3))}] for i in range(6)]
    seen = reads_while_rewritten(lambda rows: folder.write_text("trials.json", json.dumps(rows)),
                                 lambda: folder.read_json("trials.json"), versions, reads=300)
    assert all(rows in versions for rows in seen)
