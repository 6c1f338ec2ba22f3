"""The zero-shot classifier deployment: versions held per replica, batched forwards.

The model version is the `@serve.multiplexed` model id, so each replica keeps a
bounded LRU of loaded versions, Serve routes a request to a replica that already holds its
version, and a pinned version is just another id. `@serve.batch` sits on the classifier's own
method (batches are split per model id by Serve), so concurrent requests share one image-tower
pass; how long a batch waits to fill adapts to load (batch_window.py). Swapping the active
version never touches a loaded model: new requests simply carry the new id, and requests in
flight finish on the version they were routed with.

Bounds, so one client cannot slow the others: a batch counts images, not requests
(`max_batch_size`); a request's images are decoded on their own (pixel limit checked from the
header first) and its zero-shot head is looked up or built before it joins a batch (new label sets
one at a time, cached in a bounded LRU); the version unpinned requests use stays loaded whatever
pinned requests ask for, and requests waiting for other versions to load are capped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from ray import serve

from gnsp_core.zeroshot import TEMPLATES

from service.errors import BusyError
from service.serving.batch_window import BatchWindow
from service.serving.served_model import ServedModel, load_served_model
from service.settings import ServiceSettings
from service.store import ModelStore

log = logging.getLogger(__name__)


def classifier_thread_count(settings: ServiceSettings) -> int:
    """The torch threads a classifier replica uses: Ray starts actors with one, leaving cores idle."""
    if settings.classifier_threads:
        return settings.classifier_threads
    if settings.classifier_cpus >= 1:
        return int(settings.classifier_cpus)
    return os.cpu_count() or 1


def images_in(requests: list[dict[str, Any]]) -> int:
    """A batch's size for `@serve.batch`: images, not requests (each request says how many it brings)."""
    return sum(request["size"] for request in requests)


@serve.deployment(name="Classifier")
class Classifier:
    def __init__(self, settings: ServiceSettings) -> None:
        from gnsp_core.zeroshot import TextHeadCache

        threads = classifier_thread_count(settings)
        torch.set_num_threads(threads)
        self.decoders = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.settings = settings
        self.store = ModelStore.open(settings.store)
        self.cache_dir = Path(tempfile.mkdtemp(prefix="gnsp-versions-", dir=settings.scratch()))
        self.heads = TextHeadCache(settings.text_head_cache, settings.text_head_cache_labels)
        # New label sets are encoded one at a time, outside the image batch.
        self.head_builds = asyncio.Semaphore(1)
        # The version unpinned requests use: held beside the LRU, so pinned requests never evict it.
        self.resident: ServedModel | None = None
        self.loads_waiting = 0

        async def load_version(model_id: str):
            return await self._load_version(model_id)

        # Wired per instance so the LRU size comes from the settings (Ray supports this form; the
        # loader must be a plain function, not a bound method). Serve loads one model at a time.
        self.get_version = serve.multiplexed(max_num_models_per_replica=settings.max_versions_per_replica)(
            load_version)
        self.classify_batch.set_max_batch_size(settings.max_batch_size)
        self.window = BatchWindow(settings.max_batch_size, settings.batch_wait_timeout_s,
                                  settings.busy_batch_wait_max_s)

    async def _load_version(self, model_id: str) -> ServedModel:
        if self.resident is not None and str(self.resident.version) == model_id:
            return self.resident
        return await asyncio.to_thread(load_served_model, self.store, int(model_id), self.cache_dir)

    async def served(self, model_id: str, pinned: bool) -> ServedModel:
        """The loaded version for a request. The resident (active) version answers at once even when
        the LRU dropped it; a request for a version not loaded waits for its load unless too many wait."""
        resident = self.resident
        if resident is not None and str(resident.version) == model_id:
            return resident
        if self.loads_waiting >= self.settings.max_version_loads_waiting:
            raise BusyError(f"{self.loads_waiting} requests are waiting for model versions to load (the limit is "
                            f"{self.settings.max_version_loads_waiting}); retry shortly or use the active version")
        self.loads_waiting += 1
        try:
            served = await self.get_version(model_id)
        finally:
            self.loads_waiting -= 1
        if not pinned:
            self.resident = served
        return served

    async def classify(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request: {"images": [bytes], "labels": [str], "pinned": bool}; the version is the
        multiplexed model id.

        The answer's `timing` (ms: time in this replica, the batch's forward, the batch's size) lets
        the ingress say in a Server-Timing header where a request's latency went."""
        start = time.perf_counter()
        served = await self.served(serve.get_multiplexed_model_id(), bool(request.get("pinned")))
        loop = asyncio.get_running_loop()
        # Decoded here, per request, on the decode pool: a batch holds tensors only, so an image that
        # fails to decode fails its own request and never the requests batched with it.
        tensors = await asyncio.gather(*(loop.run_in_executor(self.decoders, served.pixel, raw,
                                                              self.settings.max_classify_pixels)
                                         for raw in request["images"]))
        labels = request["labels"]
        pixels = {"pixels": torch.stack(tensors), "labels": labels, "head": await self.head(served, labels),
                  "served": served, "size": min(len(tensors), self.settings.max_batch_size)}
        self.classify_batch.set_batch_wait_timeout_s(self.window.enter())
        try:
            answer = await self.classify_batch(pixels)
        finally:
            self.window.leave()
        answer["timing"]["classifier"] = 1000 * (time.perf_counter() - start)
        return answer

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
        served = requests[0]["served"]  # Serve splits batches by model id: one version per batch
        start = time.perf_counter()
        answers = await asyncio.to_thread(served.classify, requests, self.heads)
        forward = time.perf_counter() - start
        self.window.forward_took(forward)
        for answer in answers:
            answer["timing"] = {"forward": 1000 * forward, "batch": len(requests)}
        return answers

    async def check_version(self, version: int) -> dict[str, Any]:
        """Load a version and run a smoke test on it, before it may become active."""
        served = await self.served(str(version), pinned=True)
        return await asyncio.to_thread(served.check, self.heads)

    def __del__(self) -> None:
        if hasattr(self, "decoders"):
            self.decoders.shutdown(wait=False)
        shutil.rmtree(getattr(self, "cache_dir", ""), ignore_errors=True)
