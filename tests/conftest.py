"""Shared fixtures. The `platform` fixture starts the real local platform (Triton from the
nvidia-pytriton wheel, a local Ray with the Serve app) on ports of its own, once per run."""

import hashlib
import json
import os

import pytest

from mosmedai.config import Settings

# Ports of the test platform: apart from the local default (8000, 8100-8102), so a
# `make up` platform and the tests can run side by side; MOSMEDAI_TEST_PORT_OFFSET moves
# them all (two test sessions at once).
PORT_OFFSET = int(os.environ.get("MOSMEDAI_TEST_PORT_OFFSET", "0"))
TEST_PORTS = {name: port + PORT_OFFSET for name, port in {
    "gateway_http_port": 18000, "triton_http_port": 18100, "triton_grpc_port": 18101,
    "serve_proxy_port": 18099, "gateway_direct_grpc_port": 18400, "triton_metrics_port": 18102,
    "router_metrics_port": 18201, "prometheus_port": 19090, "s3_port": 18300, "grpc_port": 19000,
    "dimse_port": 21112, "second_pool_http_port": 18110}.items()}
# The test Prometheus scrapes and evaluates every second so that recorded series appear
# within seconds of the traffic that makes them.
TEST_PROMETHEUS = {"prometheus_scrape_interval_s": 1.0, "prometheus_evaluation_interval_s": 1.0}
# A long batch wait makes "an idle tool sends at once" observable: an image that waited
# for company would take at least this long.
TEST_BATCH_WAIT_MS = 400.0
# A tenant of the tests' own, beside the demo ones: its DIMSE results go to a test SCP.
TEST_TENANT_TOKEN = "test-dimse-token"
TEST_SCP_PORT = 21113 + PORT_OFFSET
TEST_TENANTS = [{
    "id": "test-dimse", "region": "RU-SPE", "institution": "Test hospital",
    "token_sha256": hashlib.sha256(TEST_TENANT_TOKEN.encode()).hexdigest(),
    "dimse": {"called_ae_title": "MOSMEDAI_TEST", "allowed_calling_aes": ["TEST_SCU"],
              "result_destination": {"ae_title": "TEST_SCP", "host": "127.0.0.1", "port": TEST_SCP_PORT}},
}]
TEST_DIMSE = {"dimse_series_quiet_s": 2.0, "dimse_retry_base_s": 1.0, "dimse_retry_max_s": 4.0}


@pytest.fixture(scope="session")
def platform_settings(tmp_path_factory) -> Settings:
    return Settings(run_dir=tmp_path_factory.mktemp("run"), router_batch_wait_ms=TEST_BATCH_WAIT_MS,
                    tenants_file=json.dumps(TEST_TENANTS), **TEST_PORTS, **TEST_PROMETHEUS, **TEST_DIMSE)


@pytest.fixture(scope="session")
def platform(platform_settings):
    from mosmedai.local import processes as local

    try:
        urls = local.up(platform_settings)
    except Exception:
        for name in ("triton.log", "serve.log", "prometheus.log"):
            path = platform_settings.log_dir / name
            if path.exists():
                print(f"--- {name} (last 60 lines) ---")
                print("\n".join(path.read_text(errors="replace").splitlines()[-60:]))
        local.down(platform_settings)
        raise
    yield urls
    local.down(platform_settings)
    assert all(pid is None for pid in local.status(platform_settings).values())


def _order(item) -> tuple:
    """Unit tests first; the integration tests, which share one platform, after them in the order
    of their top folder and file name (tests/services/<package>/test_x.py as test_x.py), so the
    platform meets them in one fixed order whatever sub-package holds them."""
    integration = "platform" in getattr(item, "fixturenames", ())
    if not integration:
        return (False,)
    parts = item.path.relative_to(item.config.rootpath).parts
    return (True, parts[1] if len(parts) > 2 else "", item.path.name)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_order)
    for item in items:
        if "platform" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
