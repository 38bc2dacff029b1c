"""The Prometheus client against a real Prometheus (Debian package) with backfilled Triton series."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from mosmedai_operator.config import OperatorConfig
from mosmedai_operator.prom import PrometheusClient, PrometheusError, render
from mosmedai_operator.testing import free_port

pytestmark = pytest.mark.asyncio

STEP = timedelta(seconds=15)


def window() -> tuple[datetime, datetime]:
    end = datetime.now(timezone.utc)
    return end - timedelta(minutes=10), end


def default_queries(pool: str, tools: list[str]) -> dict[str, str]:
    config = OperatorConfig(metrics_port=None, health_port=None)
    return {name: render(template, namespace="mosmedai", pool=pool, region="RU-MOW", tools=tools)
            for name, template in config.query_templates().items()}


async def test_default_queries_read_triton_metrics(prometheus) -> None:
    client = PrometheusClient(prometheus.url)
    try:
        samples = await client.samples(default_queries("busy", ["cxr_opacity", "cxr_nodule"]), *window(), STEP)
    finally:
        await client.close()
    assert len(samples) == 41  # 10 minutes at 15 s, both ends included
    assert [s.time for s in samples] == sorted(s.time for s in samples)
    latest = samples[-1]
    assert latest.queue_time_p95_ms == pytest.approx(400)  # 400000 us summary quantile -> ms
    assert latest.images_per_second == pytest.approx(120, rel=1e-6)  # two ensembles at 60/s each
    assert latest.gpu_utilization_percent == pytest.approx(90)  # mean of two GPUs at 0.9


async def test_tools_select_the_ensembles_counted(prometheus) -> None:
    client = PrometheusClient(prometheus.url)
    try:
        samples = await client.samples({"images_per_second": default_queries("busy", ["cxr_opacity"])["images_per_second"]}, *window(), STEP)
    finally:
        await client.close()
    assert samples[-1].images_per_second == pytest.approx(60, rel=1e-6)
    assert samples[-1].queue_time_p95_ms is None  # not asked for


async def test_missing_series_and_nan_give_no_data(prometheus) -> None:
    client = PrometheusClient(prometheus.url)
    try:
        gpu_only = await client.samples(default_queries("gpu-only", ["cxr_opacity"]), *window(), STEP)
        idle = await client.samples(default_queries("idle-summary", ["cxr_opacity"]), *window(), STEP)
        nothing = await client.samples(default_queries("no-such-pool", ["cxr_opacity"]), *window(), STEP)
    finally:
        await client.close()
    assert gpu_only[-1].gpu_utilization_percent == pytest.approx(30)
    assert gpu_only[-1].queue_time_p95_ms is None and gpu_only[-1].images_per_second is None
    assert idle[-1].queue_time_p95_ms is None  # an idle summary's quantile is NaN
    assert idle[-1].images_per_second == 0
    assert nothing == []


async def test_several_series_give_the_largest(prometheus) -> None:
    client = PrometheusClient(prometheus.url)
    try:
        values = await client.query_range('rate(nv_inference_count{gpupool="busy"}[2m])', *window(), STEP)
    finally:
        await client.close()
    assert values and all(v == pytest.approx(60, rel=1e-6) for v in values.values())


async def test_bad_query_and_unreachable_server_raise(prometheus) -> None:
    client = PrometheusClient(prometheus.url)
    try:
        with pytest.raises(PrometheusError, match="bad_data"):
            await client.query_range("sum(", *window(), STEP)
    finally:
        await client.close()
    closed = PrometheusClient(f"http://127.0.0.1:{free_port()}", timeout_seconds=2)
    try:
        with pytest.raises(PrometheusError, match="ClientConnectorError"):
            await closed.query_range("up", *window(), STEP)
    finally:
        await closed.close()
