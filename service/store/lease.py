"""The store's writer lease: one job runner at a time writes versions, the pointer and job records.

Two services can share one store: an upgrade (RayService `NewCluster`) runs the old and the new
cluster side by side for a while. Exactly one of them holds the lease; the other is standby and
runs no job until the lease is free.

The lease is a series of records `lease/<token>.json` (`holder`, `token`, `expires`). Taking the
lease is creating the record of the next token with an exclusive create (`O_EXCL` on a local
folder, `If-None-Match: *` on S3), and only once the newest record has expired (or was
released), so two services racing for it get one winner. The token only grows: it is the
fencing token. The holder renews its own record every `ttl/3`, and before every write the store
checks (`check`) that

- the holder's own deadline has not passed (it is `ttl` minus a margin after the last renewal
  that succeeded, on this machine's monotonic clock, so it ends before any other service sees
  the record expire, with the margin covering clock skew), and
- no record of a higher token exists (nobody took over meanwhile).

A holder that misses its deadline never renews again: it has lost the lease, and its writes
raise `LeaseLost`. What stays is the window of one write already past its check when a
successor takes over; the margin (a third of the ttl, 5 s by default) bounds it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Protocol

import pyarrow.fs as pafs

from service.errors import NotReadyError

log = logging.getLogger(__name__)


class LeaseStore(Protocol):
    """What a lease needs of the store it guards (a ModelStore), stated here so the store may
    import its lease without the lease importing the store."""

    uri: str

    def create_exclusive(self, rel: str, data: dict[str, Any] | bytes) -> bool: ...
    def exists(self, rel: str) -> bool: ...
    def listdir(self, rel: str) -> list[pafs.FileInfo]: ...
    def put_json_unfenced(self, rel: str, data: dict[str, Any] | bytes) -> None: ...
    def read_json(self, rel: str) -> dict[str, Any] | None: ...

LEASE_DIR = "lease"
DEFAULT_TTL_S = 15.0


class LeaseLost(NotReadyError):
    """This service does not (or no longer) hold the store's writer lease, so it must not write (503)."""

    code = "standby"


def new_holder_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _gone(holder: str | None) -> bool:
    """A holder on this machine whose process has exited (a restarted service): its lease need not
    be waited out. Holders elsewhere, or whose process may live, count as alive."""
    host, pid, _ = (holder or "--").rsplit("-", 2) if (holder or "").count("-") >= 2 else ("", "", "")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def lease_path(token: int) -> str:
    return f"{LEASE_DIR}/{token:09d}.json"


class StoreLease:
    """The writer lease on one store, held (or waited for) by one service."""

    def __init__(self, store: LeaseStore, holder: str | None = None, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.store, self.holder, self.ttl_s = store, holder or new_holder_id(), ttl_s
        self.token: int | None = None
        self._deadline = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- reading ---------------------------------------------------------------------------------

    def tokens(self) -> list[int]:
        names = [info.base_name for info in self.store.listdir(LEASE_DIR)]
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def record(self, token: int) -> dict[str, Any] | None:
        """A lease record; a torn one (its writer died creating it) reads as expired."""
        try:
            return self.store.read_json(lease_path(token))
        except (ValueError, UnicodeDecodeError):
            return {"token": token, "holder": None, "expires": 0.0}

    def current(self) -> dict[str, Any] | None:
        """The newest lease record (whoever holds it, expired or not), None for a store never leased."""
        tokens = self.tokens()
        return self.record(tokens[-1]) if tokens else None

    @property
    def held(self) -> bool:
        return self.token is not None and time.monotonic() < self._deadline

    # --- taking, keeping, giving back ------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Take the lease if it is free (never taken, expired, or released); False if another holds it."""
        with self._lock:
            if self.held:
                return True
            tokens = self.tokens()
            top = tokens[-1] if tokens else 0
            newest = self.record(top) if top else None
            if newest is not None and newest.get("expires", 0.0) > time.time() and not _gone(newest.get("holder")):
                return False
            started = time.monotonic()
            if not self.store.create_exclusive(lease_path(top + 1), self._payload(top + 1)):
                return False  # another service took this token first
            self.token, self._deadline = top + 1, started + self._held_for()
            log.warning("store %s: writer lease taken by %s (token %d)", self.store.uri, self.holder, self.token)
            return True

    def renew(self) -> bool:
        """Extend the lease; False (and the lease counts as lost) if its deadline passed or a newer token exists."""
        with self._lock:
            if not self.held or self.store.exists(lease_path(self.token + 1)):
                return self._lose()
            started = time.monotonic()
            self.store.put_json_unfenced(lease_path(self.token), self._payload(self.token))
            self._deadline = started + self._held_for()
            return True

    def check(self) -> None:
        """Fencing: raise LeaseLost unless this service still holds the lease. Called before every write."""
        token = self.token
        if token is None or time.monotonic() >= self._deadline or self.store.exists(lease_path(token + 1)):
            with self._lock:
                self._lose()
            raise LeaseLost(f"this service is standby: another service holds the writer lease of the store "
                            f"{self.store.uri}; it takes over when that lease expires")

    def release(self) -> None:
        """Give the lease back now (an orderly shutdown), so a successor need not wait for it to expire."""
        self.stop_keeping()
        with self._lock:
            if self.held and not self.store.exists(lease_path(self.token + 1)):
                self.store.put_json_unfenced(lease_path(self.token), self._payload(self.token, expires=0.0))
            self.token = None

    def keep(self, on_acquired: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """In a background thread: wait for the lease (retrying every ttl/3), renew it while held,
        and call `on_acquired` / `on_lost` when that changes."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep, args=(on_acquired, on_lost),
                                        name="gnsp-store-lease", daemon=True)
        self._thread.start()

    def stop_keeping(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.ttl_s)

    # --- internals -------------------------------------------------------------------------------

    def _keep(self, on_acquired: Callable[[], None], on_lost: Callable[[], None]) -> None:
        was_held = self.held
        while not self._stop.wait(self.ttl_s / 3):
            try:
                now_held = self.renew() if self.token is not None else self.try_acquire()
            except OSError as exc:  # the store did not answer: the deadline decides, not one error
                log.warning("store %s: lease renewal failed: %s", self.store.uri, exc)
                now_held = self.held
            if now_held != was_held:  # in its own thread: a slow callback must not delay the renewals
                threading.Thread(target=on_acquired if now_held else on_lost, daemon=True).start()
            was_held = now_held

    def _held_for(self) -> float:
        return self.ttl_s * 2 / 3

    def _lose(self) -> bool:
        if self.token is not None:
            log.warning("store %s: %s lost the writer lease (token %d)", self.store.uri, self.holder, self.token)
        self.token = None
        return False

    def _payload(self, token: int, expires: float | None = None) -> bytes:
        now = time.time()
        return json.dumps({"holder": self.holder, "token": token, "renewed": now,
                           "expires": now + self.ttl_s if expires is None else expires}).encode()
