"""The zero-shot classifier deployment: versions held per replica, batched forwards.

The model version is the `@serve.multiplexed` model id, so each replica keeps a
bounded LRU of loaded versions, Serve routes a request to a replica that already holds its
version, and a pinned version is just another id. `@serve.batch` sits on the classifier's own
method (batches are split per model id by Serve), so concurrent requests share one image-tower
pass; how long a batch waits to fill adapts to load (batch_window.py). Swapping the active
version never touches a loaded model: new requests simply carry the new id, and requests in
flight finish on the version they were routed with.
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

from service.serving.batch_window import BatchWindow
from service.serving.served_model import load_served_model
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


@serve.deployment(name="Classifier")
class Classifier:
    def __init__(self, settings: ServiceSettings) -> None:
        from gnsp_core.zeroshot import TextHeadCache

        threads = classifier_thread_count(settings)
        torch.set_num_threads(threads)
        self.decoders = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.settings = settings
        self.store = ModelStore.open(settings.store)
        self.cache_dir = Path(tempfile.mkdtemp(prefix="gnsp-versions-", dir=settings.work_dir))
        self.heads = TextHeadCache(settings.text_head_cache)
        async def load_version(model_id: str):
            return await self._load_version(model_id)

        # Wired per instance so the LRU size comes from the settings (Ray supports this form; the
        # loader must be a plain function, not a bound method).
        self.get_version = serve.multiplexed(max_num_models_per_replica=settings.max_versions_per_replica)(
            load_version)
        self.classify_batch.set_max_batch_size(settings.max_batch_size)
        self.window = BatchWindow(settings.max_batch_size, settings.batch_wait_timeout_s,
                                  settings.busy_batch_wait_max_s)

    async def _load_version(self, model_id: str):
        return await asyncio.to_thread(load_served_model, self.store, int(model_id), self.cache_dir)

    async def classify(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request: {"images": [bytes], "labels": [str]}; the version is the multiplexed model id.

        The answer's `timing` (ms: time in this replica, the batch's forward, the batch's size) lets
        the ingress say in a Server-Timing header where a request's latency went."""
        start = time.perf_counter()
        served = await self.get_version(serve.get_multiplexed_model_id())
        loop = asyncio.get_running_loop()
        # Decoded here, per request, on the decode pool: a batch holds tensors only, so an image that
        # fails to decode fails its own request and never the requests batched with it.
        tensors = await asyncio.gather(*(loop.run_in_executor(self.decoders, served.pixel, raw)
                                         for raw in request["images"]))
        pixels = {"pixels": torch.stack(tensors), "labels": request["labels"]}
        self.classify_batch.set_batch_wait_timeout_s(self.window.enter())
        try:
            answer = await self.classify_batch(pixels)
        finally:
            self.window.leave()
        answer["timing"]["classifier"] = 1000 * (time.perf_counter() - start)
        return answer

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def classify_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        served = await self.get_version(serve.get_multiplexed_model_id())
        start = time.perf_counter()
        answers = await asyncio.to_thread(served.classify, requests, self.heads)
        forward = time.perf_counter() - start
        self.window.forward_took(forward)
        for answer in answers:
            answer["timing"] = {"forward": 1000 * forward, "batch": len(requests)}
        return answers

    async def check_version(self, version: int) -> dict[str, Any]:
        """Load a version and run a smoke test on it, before it may become active."""
        served = await self.get_version(str(version))
        return await asyncio.to_thread(served.check, self.heads)

    def __del__(self) -> None:
        if hasattr(self, "decoders"):
            self.decoders.shutdown(wait=False)
        shutil.rmtree(getattr(self, "cache_dir", ""), ignore_errors=True)
