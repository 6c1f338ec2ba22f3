"""Request metrics stay right with several replicas: Ray's metrics agent sums what each replica counts."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from service_support import png_b64, running_service, service_settings

pytestmark = pytest.mark.integration


def scraped(port: int, name: str, **labels: str) -> list[float]:
    """The values of every series of `name` on Ray's metrics endpoint whose labels include `labels`."""
    values = []
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            values.append(float(line.rsplit(" ", 1)[1]))
    return values


def test_request_counts_are_summed_over_two_ingress_replicas(ray_session, tmp_path):
    node = ray_session._private.worker.global_worker.node
    settings = service_settings(tmp_path, ingress_replicas=2, classifier_cpus=0.5)
    with running_service(settings, "gnsp-metrics") as client:
        for _ in range(20):
            assert client.get("/v1/models").status_code == 200
        for _ in range(5):
            assert client.post("/v1/classify", json={"images": [png_b64("red")], "labels": ["red", "blue"]}
                               ).status_code == 200
        gauges = client.get("/metrics").text
        assert "gnsp_active_model_version 1.0" in gauges and "gnsp_jobs" in gauges
        deadline = time.monotonic() + 30  # Ray's agent exports what replicas report about every second
        models = classify = []
        while time.monotonic() < deadline:
            models = scraped(node.metrics_export_port, "ray_gnsp_http_requests_total", route="/v1/models",
                             status="200", application="gnsp-metrics")
            classify = scraped(node.metrics_export_port, "ray_gnsp_http_requests_total", route="/v1/classify",
                               application="gnsp-metrics-classify")
            if sum(models) >= 20 and sum(classify) >= 5:
                break
            time.sleep(1)
    assert sum(models) == 20 and sum(classify) == 5, (models, classify)
    assert re.search(r"gnsp_http_requests", gauges) is None  # /metrics has no per-replica counts
