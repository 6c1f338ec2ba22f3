"""The model versions one classifier replica holds, and how it loads more without stalling its requests.

The active version is resident: held beside a bounded LRU of other versions, so requests pinned
to old versions never evict it. Loading a version costs seconds of CPU that the replica's
forwards would otherwise use, so loads are scarce: one at a time, on the caller's loader thread
(never the event loop, never the forward's thread), and a pinned request that needs a new load
while one runs, or within `min_load_interval_s` of the last, is refused (BusyError, 429 with
Retry-After) rather than queued. Requests pinned round-robin to more old versions than the LRU
holds then cost one load per interval, not a load per request. Requests for the active version
and load checks before an activation always load. At most `max_waiting` requests wait for loads.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Awaitable, Callable, Generic, Protocol, TypeVar

from service.errors import BusyError


class Versioned(Protocol):
    version: int


Model = TypeVar("Model", bound=Versioned)


class VersionPool(Generic[Model]):
    def __init__(self, load: Callable[[int], Awaitable[Model]], capacity: int, max_waiting: int,
                 min_load_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._load, self.capacity, self.max_waiting = load, capacity, max_waiting
        self.min_load_interval_s, self.clock = min_load_interval_s, clock
        self.resident: Model | None = None
        self.others: OrderedDict[int, Model] = OrderedDict()
        self.loading: dict[int, asyncio.Future] = {}
        self.waiting = 0
        self.last_load_end = -float("inf")
        self._one_load = asyncio.Lock()

    def loaded(self) -> list[int]:
        return ([self.resident.version] if self.resident is not None else []) + list(self.others)

    async def get(self, version: int, pinned: bool, urgent: bool = False) -> Model:
        """The loaded `version`; `pinned` requests leave the resident version alone, and unless
        `urgent` they are refused a new load while loads are scarce."""
        model = self._held(version)
        if model is None:
            model = await self._wait_for_load(version, pinned and not urgent)
        if not pinned and model is not self.resident:
            self._make_resident(model)
        return model

    def _held(self, version: int) -> Model | None:
        if self.resident is not None and self.resident.version == version:
            return self.resident
        if version in self.others:
            self.others.move_to_end(version)
            return self.others[version]
        return None

    async def _wait_for_load(self, version: int, scarce: bool) -> Model:
        if self.waiting >= self.max_waiting:
            raise BusyError(f"{self.waiting} requests are waiting for model versions to load (the limit is "
                            f"{self.max_waiting}); retry shortly or use the active version")
        if version not in self.loading and scarce:
            since = self.clock() - self.last_load_end
            if self.loading or since < self.min_load_interval_s:
                raise BusyError(f"this classifier replica is loading another model version (it loads at most one "
                                f"every {self.min_load_interval_s:g} s); retry shortly or use the active version")
        self.waiting += 1
        try:
            if version not in self.loading:
                self.loading[version] = asyncio.ensure_future(self._load_one(version))
            return await asyncio.shield(self.loading[version])
        finally:
            self.waiting -= 1

    async def _load_one(self, version: int) -> Model:
        try:
            async with self._one_load:
                held = self._held(version)
                if held is not None:
                    return held
                try:
                    model = await self._load(version)
                finally:
                    self.last_load_end = self.clock()
                self._keep(model)
                return model
        finally:
            self.loading.pop(version, None)

    def _keep(self, model: Model) -> None:
        self.others[model.version] = model
        while len(self.others) > self.capacity:
            self.others.popitem(last=False)

    def _make_resident(self, model: Model) -> None:
        previous, self.resident = self.resident, model
        self.others.pop(model.version, None)
        if previous is not None:
            self._keep(previous)
