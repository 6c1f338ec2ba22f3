"""`gnsp serve --haproxy`: the environment that turns on Serve's HAProxy ingress for a private Ray."""

from __future__ import annotations

import pytest

from gnsp_core.errors import ConfigError
from service.cli.main import build_parser
from service.cli.serve import run_serve
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


def test_haproxy_without_a_token_is_refused_before_ray_starts(monkeypatch):
    """Ray binds the replicas' ports on every interface under HAProxy: writes need a token (or --insecure)."""
    monkeypatch.delenv("GNSP_API_TOKEN", raising=False)
    args = build_parser().parse_args(["serve", "--haproxy", "--model", "tiny"])
    with pytest.raises(ConfigError, match="without an API token"):
        run_serve(args)
