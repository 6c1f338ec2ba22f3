"""Deploying Serve applications never waits without end (service.serving.applications, which
`deploy_service` uses for the service's two applications): an application Serve cannot run by the
deadline, here a replica asking for more CPUs than the cluster has, is an error that names it, and
one whose replicas fail to start is an error that carries their failure (as plain text)."""

from __future__ import annotations

import time

import pytest

from service.errors import ServiceFault
from service_support import session_serve_port


@pytest.mark.integration
def test_an_application_that_cannot_run_is_an_error_by_the_deadline_not_a_wait_without_end(ray_session):
    from ray import serve
    from ray.serve import RunTarget

    from service.serving.applications import run_applications

    @serve.deployment(ray_actor_options={"num_cpus": 64})
    class Unplaceable:
        def __call__(self, request) -> str:
            return "never"

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Broken:
        def __init__(self) -> None:
            raise RuntimeError("this replica cannot start")

    session_serve_port()  # the session's HTTP proxy, not Serve's default port
    try:
        started = time.monotonic()
        with pytest.raises(ServiceFault, match="'unplaceable' was not running after 5 s \\(DEPLOYING\\)"):
            run_applications([RunTarget(Unplaceable.bind(), name="unplaceable", route_prefix="/unplaceable")], 5)
        assert time.monotonic() - started < 30
        with pytest.raises(ServiceFault, match="(?s)'broken' is DEPLOY_FAILED: .*this replica cannot start") as failed:
            run_applications([RunTarget(Broken.bind(), name="broken", route_prefix="/broken")], 120)
        assert "\x1b[" not in str(failed.value)  # Serve's traceback without its terminal colours
    finally:
        serve.delete("unplaceable")
        serve.delete("broken")
