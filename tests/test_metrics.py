"""common/metrics.py: a batch observed at once counts as each value observed alone; the metrics port
serves this process's metrics and is off at port 0; `recs cluster` gives each speed process a port."""

from __future__ import annotations

import math

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram

from common.metrics import BatchHistogram, serve_metrics
from common.redis_server import free_port

BUCKETS = (0.01, 0.1, 1.0, 10.0)


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def test_observe_many_counts_as_observe_one_by_one() -> None:
    values = [0.0, 0.01, 0.0100001, 0.05, 0.1, 1.0, 3.0, 10.0, 11.0, 1e6, -1.0]  # bounds themselves included
    one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
    single = Histogram("h", "h", ["stage"], buckets=BUCKETS, registry=one_by_one)
    batch = BatchHistogram("h", "h", ["stage"], buckets=BUCKETS, registry=at_once)
    for value in values:
        single.labels("x").observe(value)
    batch.labels("x").observe_many([*values[:4], math.nan])  # NaN (no arrival time) is left out
    batch.labels("x").observe_many(values[4:])
    batch.labels("x").observe_many([])
    assert samples(at_once) == pytest.approx(samples(one_by_one), rel=1e-12)  # the sum, added in another order
    assert samples(at_once)[("h_count", "")] == len(values)


def test_metrics_port_serves_this_process_and_port_zero_is_off() -> None:
    assert serve_metrics("127.0.0.1", 0) is None
    port = free_port()
    server = serve_metrics("127.0.0.1", port)
    assert server is not None
    try:
        BatchHistogram("recs_test_port_seconds", "a metric of this process").observe_many([0.5])
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "recs_test_port_seconds_count 1.0" in body
        assert serve_metrics("127.0.0.1", port) is None  # taken: logged, and the process goes on
    finally:
        server.shutdown()
        server.server_close()


def test_cluster_gives_each_speed_process_its_own_metrics_port() -> None:
    from common.settings import ClusterSettings, MetricsSettings, Settings
    from recs.cluster import services

    def ports(metrics: MetricsSettings) -> dict[str, str]:
        settings = Settings(cluster=ClusterSettings(speed_consumers=3), metrics=metrics)
        return {s.name: s.env["RECS_METRICS__SPEED_PORT"] for s in services(settings) if s.name.startswith("speed-")}

    assert ports(MetricsSettings(speed_port=9110)) == {"speed-1": "9110", "speed-2": "9111", "speed-3": "9112"}
    assert set(ports(MetricsSettings(speed_port=0)).values()) == {"0"}  # off stays off
