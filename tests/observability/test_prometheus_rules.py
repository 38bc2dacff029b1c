"""The Prometheus rule files: promtool accepts them, and promtool unit tests cover every
recording rule and every alert, each alert both firing and not firing."""

import re
import subprocess

import pytest
import yaml

from prom_helpers import PROMETHEUS_DIR, RULE_FILES, RULE_TESTS, promtool, rules


def test_there_are_rule_files_and_tests():
    assert {path.name for path in RULE_FILES} >= {"targets.rules.yaml", "volume.rules.yaml",
                                                   "time-to-result.rules.yaml", "platform.rules.yaml",
                                                   "routing.rules.yaml", "feedback.rules.yaml"}
    assert RULE_TESTS


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda path: path.name)
def test_promtool_check_rules(path):
    run = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_unit_tests_pass():
    # One promtool run for all files: it tests them in parallel.
    run = subprocess.run([promtool(), "test", "rules", *map(str, RULE_TESTS)], capture_output=True, text=True,
                         timeout=300, cwd=PROMETHEUS_DIR / "tests")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]


def _unit_tests() -> list[dict]:
    return [test for path in RULE_TESTS for test in yaml.safe_load(path.read_text())["tests"]]


def test_every_recording_rule_has_an_expected_sample():
    tested = " ".join(case["expr"] for test in _unit_tests() for case in test.get("promql_expr_test", []))
    records = {rule["record"] for rule in rules() if "record" in rule}
    missing = sorted(name for name in records if not re.search(rf"(?<![\w:]){re.escape(name)}(?![\w:])", tested))
    assert not missing, f"recording rules without a promtool unit test: {missing}"


def test_every_alert_is_tested_firing_and_not_firing():
    firing, quiet = set(), set()
    for test in _unit_tests():
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts - firing == set(), f"alerts never tested firing: {sorted(alerts - firing)}"
    assert alerts - quiet == set(), f"alerts never tested not firing: {sorted(alerts - quiet)}"


def test_every_alert_has_a_runbook_summary_and_severity():
    for rule in rules():
        if "alert" in rule:
            assert {"summary", "description", "runbook"} <= set(rule.get("annotations", {})), rule["alert"]
            assert rule["labels"]["severity"] in {"page", "warning", "ticket", "info"}, rule["alert"]
