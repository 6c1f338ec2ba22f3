"""Joining Ray, and quieting the warnings Ray raises about its own internals."""

from __future__ import annotations

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
