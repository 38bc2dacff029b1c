"""Grafana dashboards: they parse, and Prometheus accepts every PromQL expression in them."""

import json

import pytest

from prom_helpers import DASHBOARDS, BarePrometheus, as_promql, dashboard_queries


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    server = BarePrometheus(tmp_path_factory.mktemp("prometheus"))
    yield server
    server.stop()


def test_the_three_dashboards_exist_and_parse():
    boards = {path.name: json.loads(path.read_text()) for path in DASHBOARDS}
    assert set(boards) == {"mosmedai-national.json", "mosmedai-region.json", "mosmedai-tool.json"}
    assert len({board["uid"] for board in boards.values()}) == 3
    for board in boards.values():
        assert board["title"] and board["panels"] and dashboard_queries(board)
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_prometheus_accepts_every_expression(prometheus, path):
    refused = {}
    for expression in dashboard_queries(json.loads(path.read_text())):
        answer = prometheus.query(as_promql(expression))
        if answer.status_code != 200:
            refused[expression] = answer.json().get("error")
    assert not refused, refused
