"""Which stored version a classify request runs on, answered from memory in the classifier replica.

The active pointer is read from the store at most once per `ttl_s` (about a second): a swap
reaches new requests within that time, and while the store cannot be read (an object store's
hiccup) requests keep the last version read rather than failing. Pinned versions are checked
against the store's listing, also refreshed at most once per `ttl_s`, so a flood of requests
pinned to versions that do not exist is answered 404 from memory, neither touching the store
per request nor loading anything. Versions are immutable once listed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from service.errors import NotReadyError, UnknownVersionError

log = logging.getLogger(__name__)


class VersionCache:
    def __init__(self, active: Callable[[], int | None], versions: Callable[[], list[int]], ttl_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read_active, self._read_versions, self.ttl_s, self.clock = active, versions, ttl_s, clock
        self._active: int | None = None
        self._active_at = -float("inf")
        self._known: set[int] = set()
        self._listed_at = -float("inf")
        self._refresh = asyncio.Lock()

    async def resolve(self, pinned: int | None) -> int:
        """The concrete version for a request: the pinned one (known to exist) or the active one."""
        if pinned is None:
            return await self.active()
        if pinned not in self._known and self.clock() - self._listed_at >= self.ttl_s:
            await self._list()
        if pinned not in self._known:
            raise UnknownVersionError(f"model version {pinned} does not exist; GET /v1/models lists the versions")
        return pinned

    async def active(self) -> int:
        if self.clock() - self._active_at >= self.ttl_s:
            async with self._refresh:  # one read of the pointer per interval, however many requests wait
                if self.clock() - self._active_at >= self.ttl_s:
                    await self._read_pointer()
        if self._active is None:
            raise NotReadyError("the service has no active model version yet; retry shortly")
        return self._active

    async def _read_pointer(self) -> None:
        try:
            self._active = await asyncio.to_thread(self._read_active)
        except Exception as exc:  # the store is unreachable: keep serving the version last read
            if self._active is None:
                raise NotReadyError("the model store cannot be read yet; retry shortly") from exc
            log.warning("reading the active pointer failed (%s); serving version %s meanwhile", exc, self._active)
        self._active_at = self.clock()

    async def _list(self) -> None:
        try:
            self._known.update(await asyncio.to_thread(self._read_versions))
        except Exception as exc:
            log.warning("listing the stored versions failed (%s); using the %d known", exc, len(self._known))
        self._listed_at = self.clock()
