"""Helpers of the observability tests: where the Prometheus files are, promtool, a bare Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from mosmedai.config import REPO_ROOT

PROMETHEUS_DIR = REPO_ROOT / "charts" / "mosmedai" / "files" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yaml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yaml"))
DASHBOARDS = sorted((REPO_ROOT / "charts" / "mosmedai" / "files" / "grafana").glob("*.json"))


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; `make test` installs it)")
    return path


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`; `make test` installs it)")
    return path


def rules() -> list[dict]:
    """Every rule of every rule file, with its group name under 'group'."""
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            found.extend({**rule, "group": group["name"]} for rule in group["rules"])
    return found


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and query variables."""
    queries = []
    panels = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        queries.extend(target["expr"] for target in panel.get("targets", []) if target.get("expr"))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            # Grafana's label_values(selector, label): the selector is PromQL.
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
            queries.append(match.group(1) if match else query)
    return queries


# Values for Grafana's variables when an expression is checked by Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
                     "${datasource}": "", "$region": "RU-MOW", "$tool": "cxr_opacity"}


def as_promql(expression: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expression = expression.replace(name, GRAFANA_VARIABLES[name])
    return expression


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BarePrometheus:
    """A real Prometheus with no scrape targets and the rule files loaded (for query checks)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({"global": {"evaluation_interval": "1s"},
                                      "rule_files": [str(PROMETHEUS_DIR / "rules" / "*.yaml")]}))
        self.log = open(workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Prometheus did not start; see {workdir / 'prometheus.log'}")

    def query(self, expression: str) -> httpx.Response:
        return httpx.post(f"{self.url}/api/v1/query", data={"query": expression}, timeout=10)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
