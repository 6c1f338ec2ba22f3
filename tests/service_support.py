"""Helpers shared by the service tests: tiny datasets on disk, a Serve app on 127.0.0.1, polling, and
the session's live Ray Train controllers."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import socket
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import httpx
from PIL import Image

from conftest import COLOURS, colour_task
from service.jobs.states import ENDED
from service.settings import ServiceSettings

FAST_CONFIG = {"steps": 3, "batch_size": 8, "warmup_steps": 1, "lr": 1e-3}
_serve_port: int | None = None
DEPLOY_TIMEOUT_S = 300
"""A test service not running by then fails with what Serve waits for, well before the test timeout."""


def write_colour_folder(root: Path, colours: list[str], n_train: int = 6, n_test: int = 3, seed: int = 0) -> Path:
    """An ImageFolder task with train/ and test/ splits of noisy colour images."""
    task = colour_task(root.name, colours, n_train=n_train, n_test=n_test, seed=seed)
    for split, samples in (("train", task.train), ("test", task.test)):
        for i, (image, label) in enumerate(zip(samples.images, samples.labels)):
            folder = root / split / colours[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return buffer.getvalue()


def colour_zip(tmp: Path, colours: list[str], **kwargs: Any) -> bytes:
    return zip_folder(write_colour_folder(tmp / "-".join(colours), colours, **kwargs))


def png_bytes(colour: str, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


def png_b64(colour: str) -> str:
    return base64.b64encode(png_bytes(colour)).decode()


def service_settings(tmp: Path, **overrides: Any) -> ServiceSettings:
    """Tiny model, a colour held-out set, no reference pairs, small limits: fast and deterministic."""
    heldout = write_colour_folder(tmp / "heldout", ["red", "green", "blue", "yellow"], n_train=2, n_test=3, seed=7)
    fields: dict[str, Any] = dict(
        store=str(tmp / "store"), model="tiny", heldout=str(heldout), max_heldout_drop=100.0,
        reference="tests.conftest:reference_pairs", default_method="finetune", checkpoint_every=1,
        work_dir=str(tmp), max_upload_bytes=2 * 1024**2, max_total_bytes=8 * 1024**2,
        max_file_bytes=4 * 1024**2, max_image_pixels=1_000_000, max_files=500, batch_wait_timeout_s=0.005,
    )
    return ServiceSettings(**{**fields, **overrides})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(settings: ServiceSettings, name: str) -> str:
    """Deploy the app on the session's Ray (one HTTP proxy for the session); returns its base URL."""
    from service.api.app import deploy_service

    port = session_serve_port()  # first: serve.run would start Serve on its default port 8000
    deploy_service(settings, name, timeout_s=DEPLOY_TIMEOUT_S)
    return f"http://127.0.0.1:{port}"


def session_serve_port() -> int:
    """The session's one HTTP proxy on 127.0.0.1, started on first use.

    If something else (the demo, another test) already started Serve, its port stands: ask the
    controller which it is rather than assuming ours.
    """
    global _serve_port
    if _serve_port is None:
        from ray import serve
        from ray.serve.context import _get_global_client

        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        _serve_port = _get_global_client().http_config.port
    return _serve_port


def stop_service(name: str) -> None:
    from service.api.app import delete_service

    delete_service(name)


@contextlib.contextmanager
def running_service(settings: ServiceSettings, name: str) -> Iterator[httpx.Client]:
    """The app deployed as `name` for the block, with a client on its URL; deleted afterwards."""
    url = start_service(settings, name)
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client
    finally:
        stop_service(name)


def wait_for(client: httpx.Client, task_id: str, statuses: tuple[str, ...] = ENDED, timeout: float = 240) -> dict:
    """Poll GET /v1/tasks/{id} until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/tasks/{task_id}").json()
        if body["status"] in statuses or time.monotonic() > deadline:
            return body
        time.sleep(0.3)


def store_snapshot(root: Path) -> dict[str, str]:
    """Every file under the store with its hash: equal snapshots mean an unchanged store. The writer
    lease's records are left out: the job runner renews them on a clock, whatever requests arrive."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).parts[0] != "lease"}


def wait_gone(controllers: set[str], what: str, timeout: float = 30) -> None:
    """Wait until no Ray Train controller but `controllers` is alive: a job's run ends with its attempt
    (a controller left alive holds its workers and their CPUs while its process lives)."""
    wait_no_new_actors("TrainController", controllers, what, timeout)


def alive_train_controllers() -> set[str]:
    """Ids of the session's live Ray Train controller actors."""
    return alive_actors("TrainController")


def wait_no_new_actors(class_name: str, before: set[str], what: str, timeout: float = 15) -> None:
    """Wait until no live actor of `class_name` is left but those in `before`."""
    deadline = time.monotonic() + timeout
    while alive_actors(class_name) - before:
        assert time.monotonic() < deadline, f"{what} is still alive"
        time.sleep(0.2)


def alive_actors(class_name: str) -> set[str]:
    """Ids of the session's live actors of a class."""
    import ray._private.state

    return {actor["ActorID"] for actor in ray._private.state.actors().values()
            if actor["ActorClassName"] == class_name and actor["State"] == "ALIVE"}


def live_placement_groups() -> set[str]:
    """Hex ids of the session's placement groups that still reserve (or wait for) resources."""
    from ray.util.placement_group import placement_group_table

    return {pg_id for pg_id, entry in placement_group_table().items() if entry["state"] != "REMOVED"}


def wait_released(before: set[str], what: str, timeout: float = 30) -> None:
    """Wait until no placement group but those in `before` is left (what a stopped run must not hold)."""
    deadline = time.monotonic() + timeout
    while (left := live_placement_groups() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:  # released, so that the modules after this one do not wait on its CPUs
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        for pg_id in left:
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
    assert not left, f"{what} left placement groups {sorted(left)} reserved"
