"""The chart's prometheus-operator objects against prometheus-operator's own CRD schemas.

ServiceMonitor, PodMonitor and PrometheusRule are validated with the schemas that the npm
package @kubernetes-models/prometheus-operator generates from the upstream CRDs
(scripts/fetch-crd-schemas caches it in .tools/crd-schemas; `make test` fetches it first),
run by node. KubeRay's RayService schema is in no registry package (only in KubeRay's Go
module), so the RayService keeps the chart tests' own checks (test_chart.py).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.charts.test_chart import CHART, NAMESPACE, ROOT, SCENARIOS, helm, load_all, values_args

MODELS = ROOT / ".tools" / "crd-schemas"
VALIDATOR = Path(__file__).with_name("validate_custom_resources.mjs")
KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def validate(docs: list[dict[str, Any]]) -> list[str | None]:
    if shutil.which("node") is None:
        pytest.skip("no node: Debian's nodejs runs the CRD schema validators")
    if not (MODELS / "node_modules").is_dir():
        subprocess.run([str(ROOT / "scripts" / "fetch-crd-schemas"), str(MODELS)], check=True)
    result = subprocess.run(["node", str(VALIDATOR), str(MODELS)], input=json.dumps(docs),
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def monitoring_objects(chart: Path) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for scenario in SCENARIOS:
        args = values_args(scenario) if chart == CHART else ["-f", str(CHART / "ci" / scenario)] * (scenario != "defaults")
        out = load_all(helm("template", "mosmedai", str(chart), "-n", NAMESPACE, *args).stdout)
        found += [(scenario, d) for d in out if d["kind"] in KINDS]
    return found


@pytest.fixture(scope="module")
def chart_with_rules(tmp_path_factory) -> Path:
    """The chart, plus one rule file when files/prometheus/rules has none, so that a
    PrometheusRule renders whatever the observability work has committed."""
    chart = tmp_path_factory.mktemp("chart") / "mosmedai"
    shutil.copytree(CHART, chart)
    rules = chart / "files" / "prometheus" / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    if not list(rules.glob("*.y*ml")):
        rule = {"groups": [{"name": "zz-test", "rules": [
            {"alert": "ZzTest", "expr": "vector(1) > 2", "for": "5m", "labels": {"severity": "page"},
             "annotations": {"summary": "{{ $labels.region }} test"}},
            {"record": "zz:test:rate5m", "expr": "sum(rate(up[5m]))"}]}]}
        (rules / "zz-test.yml").write_text(yaml.safe_dump(rule))
    return chart


def test_monitoring_objects_pass_the_prometheus_operator_crd_schemas(chart_with_rules) -> None:
    objects = monitoring_objects(chart_with_rules)
    assert {d["kind"] for _, d in objects} == KINDS, "the monitoring scenario renders all three kinds"
    errors = validate([d for _, d in objects])
    bad = [f"{s}: {d['kind']} {d['metadata']['name']}: {e}" for (s, d), e in zip(objects, errors) if e]
    assert not bad, "\n".join(bad)


def test_the_schemas_really_reject() -> None:
    """A ServiceMonitor whose endpoints is not a list, an interval that is not a Prometheus
    duration, and an alerting rule without its expr must each be refused."""
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
               "spec": {"selector": {}, "endpoints": [{"port": "http", "interval": "30s"}]}}
    not_a_list = json.loads(json.dumps(monitor))
    not_a_list["spec"]["endpoints"] = {"port": "http"}
    bad_interval = json.loads(json.dumps(monitor))
    bad_interval["spec"]["endpoints"][0]["interval"] = "30 seconds"
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"},
            "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "for": "5m"}]}]}}
    results = validate([monitor, not_a_list, bad_interval, rule])
    assert results[0] is None, results[0]
    assert "must be array" in results[1]
    assert "interval" in results[2]
    assert "expr" in results[3]
