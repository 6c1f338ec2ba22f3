"""Deploy Serve applications and wait for them with a deadline.

`serve.run` waits for an application to be RUNNING with no limit: a replica that can never be
placed (every CPU held by other replicas, training workers or a leftover placement group) leaves
`gnsp serve` silent forever. Here the wait is bounded, and what Serve knows about the deployments
that are not running yet (e.g. "replicas that have taken more than 30s to be scheduled ...
resources required ..., total resources available ...") becomes the error.
"""

from __future__ import annotations

import re
import time
from typing import Any

from ray import serve
from ray.serve import RunTarget
from ray.serve.schema import ApplicationStatus, DeploymentStatus

from service.errors import ServiceFault

DEPLOY_TIMEOUT_S = 900.0
"""Long enough for a first start that builds the embedded default model inside a replica."""
POLL_S = 0.5
_TERMINAL_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
"""Serve colours the tracebacks in its messages; an error message is plain text."""


def run_applications(targets: list[RunTarget], timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Deploy `targets` together (their replicas start side by side), all RUNNING within `timeout_s`.

    Raises ServiceFault when an application fails to deploy or is not running by the deadline."""
    from ray.serve.context import _get_global_client

    deadline = time.monotonic() + timeout_s
    serve.run_many(targets, wait_for_applications_running=False)
    for target in targets:
        wait_running(target.name, deadline, timeout_s)
    # As serve.run ends: once the HTTP proxies (or HAProxy) route to the running applications.
    _get_global_client().wait_for_proxies_serving(wait_for_applications_running=True)


def wait_running(name: str, deadline: float, timeout_s: float) -> None:
    """Poll Serve's status of application `name` until it runs, fails or the deadline passes."""
    while True:
        app = serve.status().applications.get(name)
        status = app.status if app is not None else ApplicationStatus.NOT_STARTED
        if status == ApplicationStatus.RUNNING:
            return
        if status == ApplicationStatus.DEPLOY_FAILED:  # as serve.run: UNHEALTHY may still recover
            raise ServiceFault(f"Serve application {name!r} is {status.value}: {_details(app)}")
        if time.monotonic() > deadline:
            raise ServiceFault(f"Serve application {name!r} was not running after {timeout_s:g} s ({status.value}): "
                               f"{_details(app)}")
        time.sleep(POLL_S)


def _details(app: Any) -> str:
    """The application's message and those of its deployments that are not healthy."""
    if app is None:
        return "Serve does not know it"
    parts = [app.message] if app.message else []
    for deployment_name, deployment in app.deployments.items():
        if deployment.status != DeploymentStatus.HEALTHY and deployment.message:
            parts.append(f"{deployment_name}: {deployment.message}")
    return _TERMINAL_COLOUR.sub("", "; ".join(parts)) or "no message from Serve"
