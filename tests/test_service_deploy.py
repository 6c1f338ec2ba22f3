"""Deploying the service never waits without end: an application Serve cannot run within the
deadline (here a classifier replica asking for more CPUs than the cluster has) is an error that
names it, and what was deployed is removed by the caller as usual."""

from __future__ import annotations

import time

import pytest

from service.errors import ServiceFault
from service_support import service_settings, session_serve_port, stop_service


@pytest.mark.integration
def test_a_replica_that_cannot_be_placed_is_an_error_after_the_deadline(ray_session, tmp_path):
    from service.api.app import deploy_service

    name = "gnsp-unplaceable"
    settings = service_settings(tmp_path, classifier_cpus=64, prime_node=False)
    session_serve_port()
    started = time.monotonic()
    try:
        with pytest.raises(ServiceFault, match=f"'{name}-classify' was not running after 10 s"):
            deploy_service(settings, name, timeout_s=10)
        assert time.monotonic() - started < 60
    finally:
        stop_service(name)
