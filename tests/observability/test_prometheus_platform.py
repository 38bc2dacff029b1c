"""A real Prometheus (started by `local.up`, as `make up` does) against the running platform:
it scrapes every service, loads the rule files, and records quarter-to-date volume and time
to result from real traffic. The test platform scrapes and evaluates every second."""

import math
import subprocess
import time
from datetime import datetime, timedelta, timezone

import httpx

from mosmedai.catalog.regions import utc_offset_hours
from mosmedai.ingress.tenants import auth_headers
import pytest

from mosmedai.phantoms.chest_xray import dicom_bytes, make_phantom
from prom_helpers import promtool

REGION = "RU-MOW"  # the region of the default client token's tenant (demo-moscow)

TEST_SEED = 7_100_001
DICOM = {"Content-Type": "application/dicom"}


def lint(url: str) -> str:
    exposition = httpx.get(url, timeout=10).content
    run = subprocess.run([promtool(), "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    return (run.stdout + run.stderr).decode() if run.returncode else ""


def query(prometheus: str, expression: str) -> list[dict]:
    answer = httpx.post(f"{prometheus}/api/v1/query", data={"query": expression}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]["result"]


def wait_for(prometheus: str, expression: str, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = query(prometheus, expression)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(1.0)


@pytest.fixture(scope="module")
def prometheus(platform):
    assert "prometheus" in platform, "local.up did not start Prometheus"
    return platform["prometheus"]


def test_every_service_exposes_linted_metrics(platform, platform_settings):
    assert lint(f"{platform['gateway']}/metrics") == ""
    assert lint(f"http://{platform_settings.bind_host}:{platform_settings.router_metrics_port}/metrics") == ""
    openapi = httpx.get(f"{platform['gateway']}/openapi.json").json()
    assert "/metrics" not in openapi["paths"]


def test_prometheus_records_volume_and_time_to_result_from_traffic(platform, platform_settings, prometheus):
    loaded = {group["name"] for group in httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]}
    assert {"mosmedai-volume", "mosmedai-time-to-result", "mosmedai-platform", "mosmedai-targets",
            "mosmedai-routing"} <= loaded
    # Prometheus applies new targets in 5-second batches; each job's first scrape follows.
    # gateway, router and the two local pools' Tritons
    jobs = wait_for(prometheus, 'count by (job) (up == 1) and on () count(up == 1) == 4', 30)
    assert {sample["metric"]["job"] for sample in jobs} == {"mosmedai-gateway", "mosmedai-router", "triton"}

    # Acquired two minutes ago, Moscow time (the header carries local time without a zone).
    acquired = datetime.now(timezone(timedelta(hours=utc_offset_hours(REGION)))) - timedelta(minutes=2)
    stamp = {"AcquisitionDate": acquired.strftime("%Y%m%d"), "AcquisitionTime": acquired.strftime("%H%M%S")}
    body = dicom_bytes(make_phantom((TEST_SEED, 1), shape=(600, 500)), **stamp)
    with httpx.Client(base_url=platform["gateway"], timeout=60, headers=auth_headers()) as gateway:
        # Spread over several scrapes, so that rate() sees the counters rise.
        for _ in range(8):
            assert gateway.post("/v1/studies", content=body, headers=DICOM).status_code == 200
            time.sleep(0.5)
        assert gateway.post("/v1/studies", content=b"not dicom", headers=DICOM).status_code == 422

    region = REGION
    p95 = wait_for(prometheus, f'region:mosmedai_time_to_result_seconds:p95_5m{{region="{region}"}} > 0', 30)
    by_origin = {sample["metric"]["origin"]: float(sample["value"][1]) for sample in p95}
    assert 0 < by_origin["receipt"] < 10, by_origin
    # At least these images' two minutes. Images of earlier tests in the 5-minute window
    # may weigh more: dicom_build stamps UTC, which the gateway reads as Moscow time (+3 h).
    assert 60 < by_origin["acquisition"], by_origin
    rejected = wait_for(prometheus, 'sum by (reason) (mosmedai_rejected_inputs_total{reason="not_dicom"}) > 0', 15)
    assert rejected

    # Quarter to date integrates the rate at 1-minute steps: it shows once a minute boundary
    # has passed after the traffic (at most about a minute).
    qtd = wait_for(prometheus, f'region:mosmedai_images:quarter_to_date{{region="{region}"}} > 0', 75)
    assert qtd, "no quarter-to-date series recorded"
    images = sum(float(s["value"][1]) for s in query(prometheus, f'sum(mosmedai_images_total{{region="{region}"}})'))
    assert 0 < float(qtd[0]["value"][1]) <= images * 1.5 + 1
    ratio = query(prometheus, 'programme:mosmedai_images:quarter_to_date_target_ratio{programme="moscow"}')
    assert ratio and 0 < float(ratio[0]["value"][1]) < 1
    projected = query(prometheus, 'programme:mosmedai_images:quarter_projected{programme="moscow"}')
    assert projected and math.isfinite(float(projected[0]["value"][1]))
    # The router's view of the pools, through the routing rules.
    pools = wait_for(prometheus, 'pool:mosmedai_pool_up:max == 1', 15)
    assert {sample["metric"]["pool"] for sample in pools} == {"RU-MOW", "RU-TA"}
