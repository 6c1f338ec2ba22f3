"""The zero-shot classifier deployment: it serves POST /v1/classify itself and batches its forwards.

Each replica is the HTTP ingress of its own Serve application (classify_http.py), so a request
goes from Serve's proxy straight to the process holding the model. There it is read and checked,
its version resolved from memory (version_cache.py: the active pointer cached about a second),
its images decoded and preprocessed on a pool of threads while the previous batch's forward runs
on the forward thread, and its zero-shot head looked up or built (new label sets one at a time,
cached in a bounded LRU). Only then does it join a batch: batches hold tensors only, so a bad
image fails its own request and nothing else. A batch counts images (`max_batch_size`), splits
by version, and waits to fill only while other requests are in the replica (batch_window.py).
A request pinned to a version other than the active one is answered aside, on a thread of lower
CPU priority (decoded, its head built, its pass run there, never batched), so a burst of them takes
only the CPU that the active version's requests leave idle.

Versions (version_pool.py): the active one is held resident (pinned requests never evict it);
others sit in a bounded LRU and load one at a time (served_model.VersionLoader: each architecture
built once, each version's image tower prepared for serving) on a loader thread of their own,
never on the event loop nor on the forward's thread, at most one per `min_version_load_interval_s`
for pinned requests (more get 429 with Retry-After). Swapping the active version never touches a loaded
model: new requests resolve the new version, requests in flight finish on theirs.

No `from __future__ import annotations` here: FastAPI must see the route's real types through
Serve's class-based view.
"""

import asyncio
import gc
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from fastapi import Request
from fastapi.responses import Response
from ray import serve

from gnsp_core.zeroshot import TEMPLATES

from service.api.schemas import ClassifyResponse
from service.api.uploads import check_image, read_classify_request
from service.serving.batch_window import BatchWindow
from service.serving.classify_http import CLASSIFIER_DEPLOYMENT, CLASSIFY_ROUTE, classify_app, server_timing
from service.serving.served_model import ServedModel, VersionLoader
from service.serving.version_cache import VersionCache
from service.serving.version_pool import VersionPool
from service.settings import ServiceSettings
from service.store import ModelStore

log = logging.getLogger(__name__)
classify_api = classify_app()


def classifier_thread_count(settings: ServiceSettings, assigned_cpus: float | None = None) -> int:
    """The torch threads of a replica's forward: `classifier_threads`, else the CPUs Ray assigned the
    replica (`assigned_cpus`; the settings' `classifier_cpus` outside Ray), at least one. Never the
    host's core count: replicas and training workers beside it hold the other cores."""
    if settings.classifier_threads:
        return settings.classifier_threads
    cpus = settings.classifier_cpus if assigned_cpus is None else assigned_cpus
    return max(1, round(cpus))


def ray_assigned_cpus() -> float | None:
    """The CPUs Ray reserved for this process (None outside a Ray worker)."""
    import ray

    if not ray.is_initialized():
        return None
    return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))


GIL_SWITCH_INTERVAL_S = 0.0002
"""How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The
forward thread gives the GIL up inside every torch op and needs it back for the next one; beside
a busy Python thread (the event loop reading requests, a version loading) it waited up to the
interval per op, and a gnsp-mini forward of 8 images took 800 ms instead of 160 (1 ms: 290; 0.2 ms:
180), which is what a neighbour saw beside a burst of requests."""

BACKGROUND_NICENESS = 10


def lower_this_thread_priority() -> None:
    """Run the calling thread (and threads it starts) at a lower CPU priority: a version loading, or a
    request pinned to an old version being answered (a head of 8 templates per label is ~0.3 s of CPU
    on gnsp-mini), then takes only the CPU that the active version's forwards leave idle. Linux sets
    niceness per thread; elsewhere a no-op. (With more than one torch thread a pass also uses torch's
    shared pool, at normal priority.)"""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
    except (AttributeError, OSError):
        pass


def version_groups(requests: list[dict[str, Any]]) -> list[list[int]]:
    """The positions of a batch's requests grouped by the version that answers them (versions in the
    order first seen): requests pinned to versions in turn (2, 3, 2, 3, ...) then cost one tower
    pass per version, not one per request."""
    groups: dict[int, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request["served"].version, []).append(index)
    return list(groups.values())


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`fn(*args)` and the seconds it took."""
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def images_in(requests: list[dict[str, Any]]) -> int:
    """A batch's size for `@serve.batch`: images, not requests (each request says how many it brings)."""
    return sum(request["size"] for request in requests)


@serve.deployment(name=CLASSIFIER_DEPLOYMENT)
@serve.ingress(classify_api)
class Classifier:
    def __init__(self, settings: ServiceSettings) -> None:
        from gnsp_core.zeroshot import TextHeadCache

        threads = classifier_thread_count(settings, ray_assigned_cpus())
        torch.set_num_threads(threads)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # this replica's process is the classifier's alone
        self.decoders = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.forwarder = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="load", initializer=lower_this_thread_priority)
        self.aside = ThreadPoolExecutor(1, thread_name_prefix="pinned", initializer=lower_this_thread_priority)
        self.settings = settings
        self.store = ModelStore.open(settings.store)
        self.versions = VersionCache(self.store.active, self.store.versions, settings.active_pointer_ttl_s)
        self.cache_dir = Path(tempfile.mkdtemp(prefix="gnsp-versions-", dir=settings.scratch()))
        self.version_loader = VersionLoader(self.store, self.cache_dir)
        self.heads = TextHeadCache(settings.text_head_cache, settings.text_head_cache_labels)
        # New label sets are encoded one at a time, outside the image batch.
        self.head_builds = asyncio.Semaphore(1)
        self.pool = VersionPool(self._load_version, settings.max_versions_per_replica,
                                settings.max_version_loads_waiting, settings.min_version_load_interval_s)
        self.classify_batch.set_max_batch_size(settings.max_batch_size)
        self.window = BatchWindow(settings.max_batch_size, settings.batch_wait_timeout_s,
                                  settings.busy_batch_wait_max_s)
        # What the replica holds once started (libraries, Ray, the app) is never garbage: out of the
        # collector's generations, a full collection no longer walks it (330 ms with the GIL held,
        # no request moving, before; 20 ms after, on gnsp-mini).
        gc.freeze()

    async def _load_version(self, version: int) -> ServedModel:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.loader, self.version_loader.load, version)

    @classify_api.post(CLASSIFY_ROUTE, response_model=ClassifyResponse)
    async def classify_http(self, request: Request) -> Response:
        """POST /v1/classify as the API documents it, answered in this replica."""
        start = time.perf_counter()
        # Each image is checked on the decode pool, where it is decoded (one thread hop, not two).
        images, labels, pinned = await read_classify_request(request, self.settings, check_images=False)
        answer = await self.answer(images, labels, pinned, checked=False)
        timing = answer.pop("timing")
        body = ClassifyResponse(**answer).model_dump_json().encode()
        return Response(body, media_type="application/json",
                        headers={"Server-Timing": server_timing(timing, 1000 * (time.perf_counter() - start))})

    async def answer(self, images: list[bytes], labels: list[str], pinned: int | None,
                     checked: bool = True) -> dict[str, Any]:
        """One checked request: scores of each image over `labels` from the pinned or active version.

        The answer's `timing` (ms: time in the classifier, the batch's forward, the batch's size)
        says in the Server-Timing header where a request's latency went."""
        start = time.perf_counter()
        version = await self.versions.resolve(pinned)
        served = await self.pool.get(version, pinned is not None)
        loop = asyncio.get_running_loop()
        if served is not self.pool.resident:
            answer, seconds = await loop.run_in_executor(self.aside, timed, self.classify_aside, served, images,
                                                         labels, checked)
            answer["timing"] = {"classifier": 1000 * (time.perf_counter() - start), "forward": 1000 * seconds,
                                "pass": 1000 * seconds, "batch": 1}
            return answer
        tensors = await asyncio.gather(*(loop.run_in_executor(self.decoders, self.pixel, served, raw, i, checked)
                                         for i, raw in enumerate(images)))
        pixels = {"pixels": torch.stack(tensors), "labels": labels, "head": await self.head(served, labels),
                  "served": served, "size": min(len(tensors), self.settings.max_batch_size)}
        self.classify_batch.set_batch_wait_timeout_s(self.window.enter())
        try:
            answer = await self.classify_batch(pixels)
        finally:
            self.window.leave()
        answer["timing"]["classifier"] = 1000 * (time.perf_counter() - start)
        return answer

    def pixel(self, served: ServedModel, raw: bytes, index: int, checked: bool) -> torch.Tensor:
        """One image checked (unless it was) and decoded into the model's input, on the decode pool."""
        if not checked:
            check_image(raw, index, self.settings.max_classify_pixels)
        return served.pixel(raw, self.settings.max_classify_pixels)

    async def head(self, served: ServedModel, labels: list[str]) -> torch.Tensor:
        """The zero-shot head for `labels`: from the bounded cache, else built on a thread, one label
        set at a time, so a new label set never holds up a batch of requests."""
        head = self.heads.lookup(served.version, labels, TEMPLATES)
        if head is None:
            async with self.head_builds:
                head = await asyncio.to_thread(served.head, labels, self.heads)
        return head

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, batch_size_fn=images_in)
    async def classify_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        answers, passes = await asyncio.get_running_loop().run_in_executor(self.forwarder, timed, self.forward,
                                                                           requests)
        forward = time.perf_counter() - start
        self.window.forward_took(forward)
        for answer in answers:
            answer["timing"] = {"forward": 1000 * forward, "pass": 1000 * passes, "batch": len(requests)}
        return answers

    def forward(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A batch's answers in its requests' order, one image-tower pass per version among them."""
        answers: list[dict[str, Any]] = [{} for _ in requests]
        for indices in version_groups(requests):
            group = [requests[i] for i in indices]
            for i, answer in zip(indices, group[0]["served"].classify(group, self.heads)):
                answers[i] = answer
        return answers

    def classify_aside(self, served: ServedModel, images: list[bytes], labels: list[str],
                       checked: bool) -> dict[str, Any]:
        """A request pinned to a version other than the active one, whole, on the low-priority thread:
        its images checked and decoded, its head looked up or built, one pass of its own."""
        pixels = torch.stack([self.pixel(served, raw, i, checked) for i, raw in enumerate(images)])
        return served.classify([{"pixels": pixels, "labels": labels}], self.heads)[0]

    async def check_version(self, version: int) -> dict[str, Any]:
        """Load a version and run a smoke test on it, before it may become active."""
        served = await self.pool.get(version, pinned=True, urgent=True)
        return await asyncio.get_running_loop().run_in_executor(self.forwarder, served.check, self.heads)

    def __del__(self) -> None:
        for pool in ("decoders", "forwarder", "loader", "aside"):
            if hasattr(self, pool):
                getattr(self, pool).shutdown(wait=False)
        shutil.rmtree(getattr(self, "cache_dir", ""), ignore_errors=True)
