"""Joining Ray, quieting the warnings Ray raises about its own internals, and undoing a process-wide
handler Ray Train leaves behind."""

from __future__ import annotations

import signal
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

import ray


@contextmanager
def ray_cluster(address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """Join `address`, or start a private local Ray (never a machine-wide one); reuse one already up."""
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def quiet_ray_warnings() -> None:
    """Ray warns about its own deprecated internals; hide those (only Ray's) from users."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"ray(\.|$)")


@contextmanager
def sigint_handler_restored() -> Iterator[None]:
    """Put back this process's SIGINT handler after the block. Ray Train's `fit()` installs one
    (Ctrl-C aborts the run) whose closure holds the run's controller actor, and never removes it:
    in a process that lives on after a run (a test session, a benchmark, a tuning driver), the
    finished run's controller would stay alive until the next fit replaced the handler. Only the
    main thread has handlers; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
