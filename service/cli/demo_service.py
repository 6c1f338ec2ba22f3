"""The demo's own service: a private local Ray and the app on 127.0.0.1, quiet unless something fails.

What a demo user should see is the story and progress bars. Ray would add its own lines, each
turned off at its source rather than filtered:

- the token-authentication notice: a WARNING that Ray logs when it turns on token authentication
  by default for a new local cluster, which the demo keeps (its private Ray is the safer for it);
  the logger that writes it is set to ERROR while the demo starts Ray. Setting `RAY_AUTH_MODE`
  instead would have to happen before anything imports Ray, and `gnsp` imports it to build its
  parser;
- worker and replica output: kept in Ray's log folder (`log_to_driver=False`; the demo reports
  progress and errors from the REST API), Ray's driver-side INFO lines off (`logging_level`),
  replicas log warnings and errors only, no access log per progress poll; Serve's own logger in
  this process ("Started Serve", "Application ... is ready at") set to WARNING while the demo runs;
- "(raylet) Task ServeController.graceful_shutdown failed": `serve.shutdown()` waits on a call
  that only ends when the controller kills itself, and Ray reports that expected failure to the
  driver. When the demo started Ray it deletes its app and stops Ray, which ends Serve with it;
  it calls `serve.shutdown()` only on a Ray it joined (where stopping Ray is not its to do).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterator

import httpx

from gnsp_core.errors import GnspError

from service.ports import free_local_port

APP_NAME = "gnsp-demo"
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Where Ray logs "Token authentication is enabled for this Ray cluster ..." (a WARNING)."""
SERVE_LOGGER = "ray.serve"


class DemoError(GnspError):
    """The demo could not finish: Ray did not start, a job failed or the service answered an error."""

    code = "demo_failed"


def _start_ray() -> None:
    import ray

    from service.cli.serve import set_private_ray_environment

    set_private_ray_environment()
    notice = logging.getLogger(AUTH_NOTICE_LOGGER)
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:  # Ray raises plain Exception when its processes do not come up
        raise DemoError(f"local Ray did not start ({exc}); Ray's logs are in /tmp/ray/session_latest/logs") from exc
    finally:
        notice.setLevel(level)


@contextlib.contextmanager
def local_service(settings: Any) -> Iterator[str]:
    """Start (or join) Ray, deploy the app on 127.0.0.1; yields the base URL. Only what it started it stops."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from service.api.app import delete_service, deploy_service

    own_ray = not ray.is_initialized()
    if own_ray:
        _start_ray()
    serve_logger = logging.getLogger(SERVE_LOGGER)  # this process's "Started Serve", "is ready at" lines
    level = serve_logger.level
    serve_logger.setLevel(logging.WARNING)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_local_port()},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        port = _get_global_client().http_config.port  # an already running Serve keeps its own port
        deploy_service(settings, APP_NAME, logging_config={"enable_access_log": False, "log_level": "WARNING"})
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            with contextlib.suppress(Exception):
                delete_service(APP_NAME)
    finally:
        serve_logger.setLevel(level)
        if own_ray:
            ray.shutdown()  # stops Serve's controller and proxy with the rest of this private Ray


def check(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a successful response; the service's error message otherwise."""
    if response.is_success:
        return response.json()
    try:
        message = response.json()["error"]["message"]
    except Exception:
        message = response.text[:500]
    raise DemoError(f"{response.request.method} {response.request.url.path} -> {response.status_code}: {message}")


def wait_ready(client: httpx.Client, timeout: float = 300) -> int:
    """Wait until the service has an active version (version 1 on a new store); returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            active = client.get("/healthz").json().get("active_version")
            if active is not None:
                return int(active)
        time.sleep(0.5)
    raise DemoError(f"the service had no active model version after {timeout:.0f} s")
