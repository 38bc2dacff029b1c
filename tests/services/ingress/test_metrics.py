"""The services' Prometheus metrics: names pass promtool's lint, label values stay bounded."""

import shutil
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mosmedai.local import processes as local
from mosmedai.config import Settings
from mosmedai.ingress.metrics import GatewayMetrics, modality_label
from mosmedai.serving.metrics import RouterMetrics
from mosmedai.ingress.tenants import Tenant


def lint(exposition: bytes) -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    run = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    return (run.stdout + run.stderr).decode() if run.returncode else ""


def samples(exposition: bytes) -> dict:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(exposition.decode()) for sample in family.samples}


def test_gateway_metrics_pass_the_lint_and_count_what_happened():
    kaliningrad = Tenant("kgd-oblast-hospital", "RU-KGD", "Областная больница", "0" * 64)
    kazan = Tenant("kazan-rkb", "RU-TA", "РКБ", "1" * 64)
    metrics = GatewayMetrics([kaliningrad, kazan], ["cxr_opacity", "cxr_nodule"])
    metrics.observe_request("/v1/studies", "POST", 200, 0.12)
    metrics.rejected_input(kaliningrad, "not_dicom")
    metrics.rejected_input(None, "unauthenticated")  # no tenant known yet
    outcomes = {"cxr_opacity": "positive", "cxr_nodule": "negative"}
    metrics.image_done(kaliningrad, "DX", "1.2.3", outcomes, receipt_seconds=0.4, acquisition_seconds=300.0)
    metrics.image_done(kaliningrad, "DX", "1.2.3", outcomes, receipt_seconds=0.4, acquisition_seconds=-5.0)  # clock skew
    metrics.image_failed(kaliningrad, "CR", {"cxr_opacity": "failed", "cxr_nodule": "negative"})
    metrics.image_done(kazan, "DX", "1.2.4", outcomes, receipt_seconds=0.2, acquisition_seconds=None)
    metrics.shed_study(kazan, "overloaded")
    metrics.set_backlog({"RU-TA": 3})
    exposition = metrics.exposition()
    assert lint(exposition) == ""
    got = samples(exposition)
    # region and institution are the tenant's region and id, never free text
    base = (("institution", "kgd-oblast-hospital"), ("modality", "DX"), ("region", "RU-KGD"))
    assert got[("mosmedai_images_total", base)] == 2
    assert got[("mosmedai_images_total", (("institution", "kazan-rkb"), ("modality", "DX"), ("region", "RU-TA")))] == 1
    assert got[("mosmedai_studies_total", base)] == 1
    assert got[("mosmedai_images_failed_total", (base[0], ("modality", "CR"), base[2]))] == 1
    assert got[("mosmedai_time_to_result_seconds_count", (("modality", "DX"), ("origin", "receipt"), ("region", "RU-KGD")))] == 2
    # A negative acquisition delay (clock skew) is not observed.
    assert got[("mosmedai_time_to_result_seconds_count", (("modality", "DX"), ("origin", "acquisition"), ("region", "RU-KGD")))] == 1
    assert got[("mosmedai_time_to_result_seconds_bucket", (("le", "900.0"), ("modality", "DX"), ("origin", "receipt"), ("region", "RU-KGD")))] == 2
    assert got[("mosmedai_rejected_inputs_total", (base[0], ("reason", "not_dicom"), base[2]))] == 1
    assert got[("mosmedai_rejected_inputs_total", (("institution", "unknown"), ("reason", "unauthenticated"), ("region", "unknown")))] == 1
    assert got[("mosmedai_shed_total", (("institution", "kazan-rkb"), ("reason", "overloaded"), ("region", "RU-TA")))] == 1
    assert got[("mosmedai_jobs_backlog", (("region", "RU-TA"),))] == 3
    assert got[("mosmedai_jobs_backlog", (("region", "RU-KGD"),))] == 0
    # Each tenant region's UTC offset, from the platform's table (Kaliningrad +2, Kazan +3).
    assert got[("mosmedai_region_utc_offset_seconds", (("region", "RU-KGD"),))] == 7200
    assert got[("mosmedai_region_utc_offset_seconds", (("region", "RU-TA"),))] == 10800
    assert got[("mosmedai_gateway_http_requests_total", (("code", "200"), ("endpoint", "/v1/studies"), ("method", "POST")))] == 1


def test_modality_labels_come_from_a_fixed_list():
    assert modality_label("DX") == "DX"
    assert modality_label("") == "unknown"
    assert modality_label("ANYTHING A SENDER WRITES") == "OT"


def test_router_metrics_pass_the_lint():
    metrics = RouterMetrics(["cxr_opacity"])
    metrics.batch_size["cxr_opacity"].observe(3)
    metrics.queue_depth["cxr_opacity"].inc(2)
    metrics.triton_requests.labels("RU-MOW", "cxr_opacity", "ok").inc()
    metrics.routed.labels("RU-MOW", "RU-TA", "cxr_opacity", "spill").inc()
    metrics.pool_up.labels("RU-MOW").set(1)
    assert lint(metrics.exposition()) == ""


def test_operator_metrics_pass_the_lint():
    code = ("import sys, mosmedai_operator.metrics\n"
            "from prometheus_client import REGISTRY, generate_latest\n"
            "sys.stdout.buffer.write(generate_latest(REGISTRY))")
    exposition = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=60).stdout
    assert b"mosmedai_operator_scaling_decisions_total" in exposition
    assert lint(exposition) == ""


def test_local_prometheus_scrapes_every_replica_and_loads_the_rules(tmp_path):
    settings = Settings(run_dir=tmp_path, gateway_replicas=2, router_replicas=2)
    config = local.prometheus_config(settings)
    targets = {job["job_name"]: [t for group in job["static_configs"] for t in group["targets"]]
               for job in config["scrape_configs"]}
    assert targets == {"mosmedai-gateway": ["127.0.0.1:8000", "127.0.0.1:8001"],
                       "mosmedai-router": ["127.0.0.1:8201", "127.0.0.1:8202"],
                       "triton": ["127.0.0.1:8102", "127.0.0.1:8112"]}
    assert config["rule_files"] == [str(local.PROMETHEUS_FILES / "rules" / "*.yaml")]


def test_up_without_prometheus_says_why(tmp_path):
    settings = Settings(run_dir=tmp_path, prometheus_binary="no-such-prometheus-binary")
    assert "not installed" in local._start_prometheus(settings, "http://127.0.0.1:1")
