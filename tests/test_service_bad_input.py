"""Bad input over HTTP: every case is a 4xx with a JSON error, and the store is byte-for-byte unchanged."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import tempfile
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Callable

import httpx
import pytest
from PIL import Image

from service_support import (colour_zip, png_b64, png_bytes, service_settings, start_service, stop_service,
                             store_snapshot, write_colour_folder, zip_folder)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
TOKEN = "s3cret-token"
JSON = "application/json"


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    settings = service_settings(tmp, api_token=TOKEN, metrics_need_token=True, max_classify_pixels=1_000_000,
                                body_idle_timeout_s=1.0, classify_idle_timeout_s=1.0, max_concurrent_uploads=1,
                                upload_slot_wait_s=0.5)
    url = start_service(settings, "gnsp-bad-input")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=60, headers=auth) as client, httpx.Client(base_url=url, timeout=60) as anon:
        yield client, anon, tmp, Path(settings.store)
    stop_service("gnsp-bad-input")


def zip_entries(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def zip_with_symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("red/0.png", png_bytes("red"))
        zf.writestr("blue/0.png", png_bytes("blue"))
        link = zipfile.ZipInfo("blue/1.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def tar_with_symlink() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name in ("red/0.png", "blue/0.png"):
            data = png_bytes(name.split("/")[0])
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("blue/1.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return buffer.getvalue()


def zip_bomb() -> bytes:
    """20 MB of zeros in a 20 KB zip: over the 4 MB per-file limit the test service uses."""
    return zip_entries({"red/0.png": png_bytes("red"), "blue/bomb.png": bytes(20 * 1024**2)})


def huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1100, 1100), (0, 0, 200)).save(buffer, format="PNG")  # 1.21 M pixels > 1 M limit
    return buffer.getvalue()


def task(client: httpx.Client, dataset: bytes | None, name: str = "t", **fields: str) -> httpx.Response:
    files = {"dataset": ("data.zip", dataset, "application/zip")} if dataset is not None else None
    return client.post("/v1/tasks", data={"name": name, **fields}, files=files or {"other": ("x", b"x")})


def chunked_upload(client: httpx.Client, size: int) -> httpx.Response:
    """A multipart body sent chunked (no Content-Length): the limit must hold while streaming."""
    boundary = "gnsp-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"dataset\"; filename=\"big.zip\"\r\n"
            "Content-Type: application/zip\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(size // 65536):
            yield os.urandom(65536)
        yield f"\r\n--{boundary}--\r\n".encode()

    content_type = f"multipart/form-data; boundary={boundary}"
    return client.post("/v1/tasks", content=body(), headers={"content-type": content_type})


def stalled_body(client: httpx.Client) -> httpx.Response:
    """A classify body that stops for longer than the service's 1 s idle limit after its first chunk."""
    def body():
        yield b'{"images": ['
        time.sleep(2.5)
        yield b"]}"

    return client.post("/v1/classify", content=body(), headers={"content-type": JSON})


def many_headers_upload(client: httpx.Client) -> httpx.Response:
    boundary = "gnsp-test-boundary"
    headers = "".join(f"X-Pad-{i}: {'p' * 100}\r\n" for i in range(20))
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n{headers}\r\nx\r\n"
            f"--{boundary}--\r\n").encode()
    return client.post("/v1/tasks", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})


def empty_folders_zip() -> bytes:
    """600 empty folders beside a valid dataset: over the test service's 500-entry limit."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(600):
            zf.writestr(zipfile.ZipInfo(f"red/empty{i}/"), b"")
        zf.writestr("red/0.png", png_bytes("red"))
        zf.writestr("blue/0.png", png_bytes("blue"))
    return buffer.getvalue()


def tiff_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buffer, format="TIFF")
    return base64.b64encode(buffer.getvalue()).decode()


def good_zip(tmp: Path) -> bytes:
    return colour_zip(tmp, ["red", "blue"], n_train=2, n_test=1)


def one_class_zip(tmp: Path) -> bytes:
    return zip_folder(write_colour_folder(tmp / "one", ["red"], n_train=2, n_test=1))


def classify_files(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/classify", files=[("images", ("a.png", png_bytes("red"), "image/png"))])


def classify(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/v1/classify", json={"images": [png_b64("red")], "labels": ["red", "blue"], **body})


Case = Callable[[httpx.Client, httpx.Client, Path], httpx.Response]
UNKNOWN_TASK = "task-20250101-120000-abcdef"  # well formed, never created
CASES: dict[str, tuple[Case, int, str]] = {
    "corrupt archive": (lambda c, a, t: task(c, b"PK\x03\x04" + os.urandom(2000)), 400, "bad_dataset"),
    "not an archive": (lambda c, a, t: task(c, png_bytes("red")), 415, "unsupported_media_type"),
    "zip slip": (lambda c, a, t: task(c, zip_entries({"red/0.png": png_bytes("red"), "../../evil.png": b"x"})),
                 400, "bad_dataset"),
    "absolute path": (lambda c, a, t: task(c, zip_entries({"red/0.png": png_bytes("red"), "/tmp/evil.png": b"x"})),
                      400, "bad_dataset"),
    "zip symlink": (lambda c, a, t: task(c, zip_with_symlink()), 400, "bad_dataset"),
    "tar symlink": (lambda c, a, t: task(c, tar_with_symlink()), 400, "bad_dataset"),
    "zip bomb": (lambda c, a, t: task(c, zip_bomb()), 400, "bad_dataset"),
    "non-image files": (lambda c, a, t: task(c, zip_entries({"red/a.txt": b"hello", "blue/b.txt": b"world"})),
                        400, "bad_dataset"),
    "one class": (lambda c, a, t: task(c, one_class_zip(t)), 400, "bad_dataset"),
    "empty archive": (lambda c, a, t: task(c, zip_entries({})), 400, "bad_dataset"),
    "oversized upload": (lambda c, a, t: task(c, os.urandom(3 * 1024**2)), 413, "upload_too_large"),
    "oversized chunked upload": (lambda c, a, t: chunked_upload(c, 3 * 1024**2), 413, "upload_too_large"),
    "huge image": (lambda c, a, t: task(c, zip_entries({"red/0.png": png_bytes("red"), "blue/0.png": huge_png()})),
                   400, "bad_dataset"),
    "missing dataset": (lambda c, a, t: task(c, None), 400, "bad_request"),
    "missing name": (lambda c, a, t: task(c, good_zip(t), name=""), 400, "bad_request"),
    "not multipart": (lambda c, a, t: c.post("/v1/tasks", json={"name": "x"}), 415, "unsupported_media_type"),
    "config not JSON": (lambda c, a, t: task(c, good_zip(t), config="{steps: 3"), 400, "bad_request"),
    "unknown config key": (lambda c, a, t: task(c, good_zip(t), config=json.dumps({"stepz": 3})), 422, "invalid_request"),
    "bad config value": (lambda c, a, t: task(c, good_zip(t), config=json.dumps({"steps": "many"})),
                         422, "invalid_request"),
    "method of the wrong type": (lambda c, a, t: task(c, good_zip(t), config=json.dumps({"method": 5})),
                                 422, "invalid_request"),
    "trainable regex": (lambda c, a, t: task(c, good_zip(t), config=json.dumps({"trainable": "(a+)+$"})),
                        422, "invalid_request"),
    "projection scope regex": (lambda c, a, t: task(c, good_zip(t), config=json.dumps({"projection": {"scope": "("}})),
                               422, "invalid_request"),
    "worker processes": (lambda c, a, t: task(c, good_zip(t), config=json.dumps({"num_workers": 64})),
                         422, "invalid_request"),
    "a device": (lambda c, a, t: task(c, good_zip(t), config=json.dumps({"device": "cuda:7"})), 422, "invalid_request"),
    "steps out of range": (lambda c, a, t: task(c, good_zip(t), config=json.dumps({"steps": 10**9})),
                           422, "invalid_request"),
    "config not an object": (lambda c, a, t: task(c, good_zip(t), config="[3]"), 422, "invalid_request"),
    "unknown method": (lambda c, a, t: task(c, good_zip(t), method="magic"), 422, "invalid_request"),
    "tune config with a device": (lambda c, a, t: c.post("/v1/tune", json={"tasks": ["digits"],
                                                                          "config": {"device": "cuda:7"}}),
                                  422, "invalid_request"),
    "unknown schedule": (lambda c, a, t: task(c, good_zip(t), config=json.dumps({"schedule": "order-III"})),
                         422, "invalid_request"),
    "threshold off the cut-off rule": (lambda c, a, t: task(c, good_zip(t), config=json.dumps(
        {"projection": {"rule": "cutoff", "threshold": 0.5}})), 422, "invalid_request"),
    "base version not a number": (lambda c, a, t: task(c, good_zip(t), base_version="latest"), 422, "invalid_request"),
    "unknown base version": (lambda c, a, t: task(c, good_zip(t), base_version="99"), 404, "unknown_version"),
    "search range off the rule": (lambda c, a, t: c.post("/v1/tune", json={"tasks": ["digits"],
                                                                          "space": {"threshold": [0.5, 2]}}),
                                  422, "invalid_request"),
    "search of another method": (lambda c, a, t: c.post("/v1/tune", json={"tasks": ["digits"],
                                                                         "config": {"method": "lwf"}}),
                                 422, "invalid_request"),
    "missing token": (lambda c, a, t: task(a, good_zip(t)), 401, "unauthorized"),
    "wrong token": (lambda c, a, t: a.post("/v1/models/1/activate", headers={"Authorization": "Bearer nope"}),
                    401, "unauthorized"),
    "cancel without token": (lambda c, a, t: a.delete(f"/v1/tasks/{UNKNOWN_TASK}"), 401, "unauthorized"),
    "unknown version": (lambda c, a, t: classify(c, model_version=99), 404, "unknown_version"),
    "unknown version info": (lambda c, a, t: c.get("/v1/models/99"), 404, "unknown_version"),
    "activate unknown version": (lambda c, a, t: c.post("/v1/models/99/activate"), 404, "unknown_version"),
    "version not a number": (lambda c, a, t: c.get("/v1/models/latest"), 422, "invalid_request"),
    "unknown task": (lambda c, a, t: c.get(f"/v1/tasks/{UNKNOWN_TASK}"), 404, "unknown_task"),
    "cancel unknown task": (lambda c, a, t: c.delete(f"/v1/tasks/{UNKNOWN_TASK}"), 404, "unknown_task"),
    "not a task id": (lambda c, a, t: c.get("/v1/tasks/task-nope"), 422, "invalid_request"),
    "version 0": (lambda c, a, t: c.get("/v1/models/0"), 422, "invalid_request"),
    "bad base64": (lambda c, a, t: classify(c, images=["not base64!!"]), 400, "bad_image"),
    "base64 of text": (lambda c, a, t: classify(c, images=[base64.b64encode(b"hello").decode()]), 400, "bad_image"),
    "huge image to classify": (lambda c, a, t: classify(c, images=[base64.b64encode(huge_png()).decode()]),
                               400, "bad_image"),
    "empty labels": (lambda c, a, t: classify(c, labels=[]), 422, "invalid_request"),
    "blank label": (lambda c, a, t: classify(c, labels=["red", " "]), 400, "bad_request"),
    "duplicate labels": (lambda c, a, t: classify(c, labels=["red", "red"]), 400, "bad_request"),
    "no images": (lambda c, a, t: classify(c, images=[]), 422, "invalid_request"),
    "malformed JSON": (lambda c, a, t: c.post("/v1/classify", content=b"{", headers={"content-type": JSON}),
                       422, "invalid_request"),
    "classify as text": (lambda c, a, t: c.post("/v1/classify", content=b"red", headers={"content-type": "text/plain"}),
                         415, "unsupported_media_type"),
    "multipart without labels": (lambda c, a, t: classify_files(c),
                                 400, "bad_request"),
    "unknown route": (lambda c, a, t: c.get("/v2/everything"), 404, "not_found"),
    "too many images": (lambda c, a, t: classify(c, images=[png_b64("red")] * 65), 400, "bad_request"),
    "too many labels": (lambda c, a, t: classify(c, labels=[f"label {i}" for i in range(1001)]), 400, "bad_request"),
    "label too long": (lambda c, a, t: classify(c, labels=["red", "x" * 201]), 400, "bad_request"),
    "image format off the allow-list": (lambda c, a, t: classify(c, images=[tiff_b64()]), 400, "bad_image"),
    "stalled classify body": (lambda c, a, t: stalled_body(c), 408, "request_timeout"),
    "too many part headers": (lambda c, a, t: many_headers_upload(c), 400, "bad_request"),
    "empty folders over the entry limit": (lambda c, a, t: task(c, empty_folders_zip()), 400, "bad_dataset"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_4xx_and_leaves_the_store_unchanged(service, case):
    client, anon, tmp, store = service
    send, status, code = CASES[case]
    before = store_snapshot(store)
    response = send(client, anon, tmp)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and len(error["message"]) > 10, error
    assert str(tmp) not in error["message"] and tempfile.gettempdir() not in error["message"], error
    assert "Traceback" not in error["message"]
    assert store_snapshot(store) == before
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


CONFIG_FIELDS = {"method of the wrong type": "config.method", "trainable regex": "config.trainable",
                 "projection scope regex": "config.projection.scope", "worker processes": "config.num_workers",
                 "a device": "config.device", "steps out of range": "config.steps", "bad config value": "config.steps",
                 "unknown config key": "config.stepz", "unknown method": "method",
                 "tune config with a device": "config.device"}


@pytest.mark.parametrize("case", list(CONFIG_FIELDS))
def test_a_refused_config_names_its_field(service, case):
    client, anon, tmp, store = service
    message = CASES[case][0](client, anon, tmp).json()["error"]["message"]
    assert message.startswith(CONFIG_FIELDS[case] + ":"), message


def test_a_bad_file_in_a_dataset_is_named_by_its_path_in_the_archive(service):
    client, anon, tmp, store = service
    response = task(client, zip_entries({"pets/red/0.png": png_bytes("red"), "pets/blue/0.png": b"no image"}))
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("pets/blue/0.png is not a readable "), message


# Every route that changes the service, called so that it would succeed or fail for a reason other
# than the token (an unknown id, a refused body) once the token is right.
WRITES = {
    ("POST", "/v1/tasks"): (lambda c, h: c.post("/v1/tasks", data={"name": "x"}, files={"other": ("x", b"x")},
                                                headers=h), 400),
    ("DELETE", "/v1/tasks/{task_id}"): (lambda c, h: c.delete("/v1/tasks/task-20260101-000000-abcdef", headers=h), 404),
    ("POST", "/v1/tune"): (lambda c, h: c.post("/v1/tune", json={"tasks": ["digits"], "trials": 0}, headers=h), 422),
    ("DELETE", "/v1/tune/{job_id}"): (lambda c, h: c.delete("/v1/tune/tune-20260101-000000-abcdef", headers=h), 404),
    ("POST", "/v1/tune/{job_id}/apply"): (lambda c, h: c.post("/v1/tune/tune-20260101-000000-abcdef/apply", headers=h), 404),
    ("POST", "/v1/models/{version}/activate"): (lambda c, h: c.post("/v1/models/1/activate", headers=h), 200),
}


def test_the_test_covers_every_write_route_of_the_api(service):
    client, anon, tmp, store = service
    doc = client.get("/openapi.json").json()
    secured = {(m.upper(), p) for p, ops in doc["paths"].items() for m, op in ops.items() if op.get("security")}
    every = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops if m != "get"} - {("POST", "/v1/classify")}
    assert secured - {("GET", "/metrics")} == every == set(WRITES)
    assert ("GET", "/metrics") in secured  # this service has metrics_need_token


@pytest.mark.parametrize("route", list(WRITES), ids=" ".join)
def test_every_write_route_needs_the_token(service, route):
    client, anon, tmp, store = service
    send, status = WRITES[route]
    before = store_snapshot(store)
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        response = send(anon, headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert store_snapshot(store) == before
    response = send(anon, {"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == status, response.text


def test_metrics_can_require_the_token(service):
    client, anon, tmp, store = service
    assert anon.get("/metrics").status_code == 401
    assert client.get("/metrics").status_code == 200 and "gnsp" in client.get("/metrics").text
    assert anon.get("/healthz").status_code == 200 and anon.get("/v1/tasks").status_code == 200


def test_service_still_works_after_bad_input(service):
    client, anon, tmp, store = service
    answer = classify(anon).json()  # classify is a read: no token needed
    assert answer["model_version"] == 1 and answer["results"][0]["label"] in ("red", "blue")
    assert client.get("/v1/tasks").json() == {"tasks": []}


def truncated_jpeg() -> str:
    """A JPEG whose header is intact (it passes the ingress's checks) but whose data stops early."""
    buffer = io.BytesIO()
    Image.effect_noise((96, 96), 60).convert("RGB").save(buffer, format="JPEG", quality=95)
    return base64.b64encode(buffer.getvalue()[: len(buffer.getvalue()) // 3]).decode()


def test_one_bad_image_fails_only_its_own_request(service):
    """Eight requests at once, one with an undecodable image: they may share a batch, but only that
    one is refused; the other seven are answered."""
    from concurrent.futures import ThreadPoolExecutor

    client, anon, tmp, store = service
    bodies = [{"images": [png_b64("red")], "labels": ["red", "blue"]} for _ in range(7)]
    bodies.insert(3, {"images": [png_b64("blue"), truncated_jpeg()], "labels": ["red", "blue"]})
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: anon.post("/v1/classify", json=body), bodies))
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 200, 200, 400, 200, 200, 200, 200], [r.text for r in responses]
    assert responses[3].json()["error"]["code"] == "bad_image"
    assert all(r.json()["results"][0]["label"] == "red" for i, r in enumerate(responses) if i != 3)


def test_a_request_with_more_images_than_a_batch_is_answered(service):
    """A batch holds at most 16 images; a 20-image request is a batch of its own, not an error."""
    client, anon, tmp, store = service
    response = anon.post("/v1/classify", json={"images": [png_b64("red")] * 20, "labels": ["red", "blue"]})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 20


def test_the_openapi_document_states_the_classify_limits(service):
    client, anon, tmp, store = service
    body = anon.get("/openapi.json").json()["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    properties = body["application/json"]["schema"]["properties"]
    assert properties["images"]["maxItems"] == 64 and properties["labels"]["maxItems"] == 1000
    assert properties["labels"]["items"]["maxLength"] == 200
    assert "1000000 pixels" in properties["images"]["description"]  # this service's setting, not the default


def test_an_upload_in_progress_neither_stalls_classify_nor_lets_a_second_upload_in(service):
    """One upload trickles in until the test has its answers (its slot held, the only one): classify
    requests answer meanwhile, and a second upload is refused with 429 within the 0.5 s slot wait."""
    client, anon, tmp, store = service
    boundary = "gnsp-test-boundary"

    def trickle():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nslow\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"dataset\"; filename=\"d.zip\"\r\n"
               "Content-Type: application/zip\r\n\r\n").encode()
        for _ in range(200):  # at most 60 s; ends as soon as the second upload has been answered
            if answered.wait(0.3):
                break
            yield b"PK" * 10
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    answered = threading.Event()
    slow: dict[str, httpx.Response] = {}
    uploader = threading.Thread(target=lambda: slow.update(r=client.post("/v1/tasks", content=trickle(),
                                                                          headers=headers)))
    uploader.start()
    time.sleep(0.8)
    latencies = []
    for _ in range(5):
        started = time.perf_counter()
        assert classify(anon).status_code == 200
        latencies.append(time.perf_counter() - started)
    try:
        second = task(client, good_zip(tmp))
    finally:
        answered.set()
    uploader.join(timeout=30)
    assert second.status_code == 429 and second.json()["error"]["code"] == "busy", second.text
    assert max(latencies) < 2.0, latencies
    assert uploader.is_alive() is False and slow["r"].status_code == 415  # not an archive, refused after
