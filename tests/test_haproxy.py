"""`gnsp serve --haproxy`: the environment that turns on Serve's HAProxy ingress for a private Ray."""

from __future__ import annotations

from service.cli.main import build_parser
from service.serving.haproxy import DRAINING_S, haproxy_environment


def test_haproxy_environment_turns_it_on_with_ports_of_its_own():
    env = haproxy_environment()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    ports = {int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])}
    assert len(ports) == 2 and not ports & {8404, 9101}  # never the fixed defaults two services would share
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) == DRAINING_S < 30


def test_serve_takes_the_haproxy_flag():
    args = build_parser().parse_args(["serve", "--haproxy", "--model", "tiny"])
    assert args.haproxy is True
    assert build_parser().parse_args(["serve"]).haproxy is False
