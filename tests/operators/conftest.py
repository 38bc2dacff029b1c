"""Fixtures for the operator's tests: kmock's Kubernetes API emulator, a real Prometheus,
a temporary model repository, and the operator itself run by kopf.testing.KopfRunner."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from mosmedai_operator.config import OperatorConfig
from mosmedai_operator.testing import (
    PROMETHEUS,
    PROMTOOL,
    ClusterEmulator,
    PrometheusServer,
    openmetrics_pool,
    openmetrics_text,
    write_kubeconfig,
    write_model_repository,
)

# Shared values live in fixtures, not module globals: test folders have no __init__.py,
# so a test module cannot import this conftest by name.
NAMESPACE = "mosmedai"
TOOLS = ["cxr_opacity", "cxr_nodule", "cxr_pneumothorax"]
UNREACHABLE_PROMETHEUS = "http://127.0.0.1:9"  # discard port: nothing listens, connection refused

# Series in the session's Prometheus: (pool, values). Constant, so results are exact.
PROMETHEUS_POOLS: dict[str, dict[str, Any]] = {
    "busy": {"queue_p95_ms": 400, "images_per_second": 120, "gpu_utilization_percent": 90, "gpus": 2,
             "models": ("cxr_opacity", "cxr_nodule")},
    "gpu-only": {"gpu_utilization_percent": 30},
    "idle-summary": {"queue_p95_ms": float("nan"), "images_per_second": 0},
}


@pytest.fixture
def kmock_options() -> dict[str, Any]:
    # kmock's own fixture with our subclass: API-server metadata and garbage collection.
    return {"cls": ClusterEmulator}


@pytest_asyncio.fixture
async def cluster(kmock: ClusterEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ClusterEmulator:
    kmock.declare_resources()
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url))))
    return kmock


@pytest.fixture
def model_repository(tmp_path: Path) -> Path:
    return write_model_repository(tmp_path / "model_repository", TOOLS)


@pytest.fixture
def make_config(model_repository: Path):
    def make(**overrides: Any) -> OperatorConfig:
        values: dict[str, Any] = dict(
            namespaces=[NAMESPACE], standalone=True, prometheus_url=UNREACHABLE_PROMETHEUS,
            model_repository_path=model_repository, model_repository_refresh_seconds=0,
            autoscale_interval_seconds=60, retry_delay_seconds=0.5, metrics_port=None, health_port=None,
            prometheus_timeout_seconds=2, triton_image="triton:test",
        )
        values.update(overrides)
        return OperatorConfig(**values)
    return make


@pytest.fixture(scope="session")
def prometheus() -> Iterator[PrometheusServer]:
    if not (os.access(PROMETHEUS, os.X_OK) and os.access(PROMTOOL, os.X_OK)):
        pytest.skip(f"needs the Debian package 'prometheus' ({PROMETHEUS} and {PROMTOOL} not found)")
    now = time.time()
    # An hour of history and half an hour ahead, so that "now" stays inside the series
    # for the whole session and rate() windows are full.
    text = openmetrics_text(openmetrics_pool(NAMESPACE, pool, start=now - 3600, end=now + 1800, **values)
                            for pool, values in PROMETHEUS_POOLS.items())
    with PrometheusServer(text) as server:
        yield server


@pytest.fixture
def namespace() -> str:
    return NAMESPACE
