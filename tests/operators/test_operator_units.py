"""Small pure parts: model repository listing, configuration, drift comparison, conditions."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from mosmedai_operator.children import Owned, is_subset, merge_patch, strip_nones
from mosmedai_operator.config import OperatorConfig
from mosmedai_operator.modelrepo import ToolCatalog, list_ensembles
from mosmedai_operator.prom import render
from mosmedai_operator.spec import GpuPoolSpec, semantic_problems, validate
from mosmedai_operator.status import condition, merge_conditions, status_patch
from mosmedai_operator.testing import write_model_repository


def test_list_ensembles_reads_only_ensembles(tmp_path: Path) -> None:
    repo = write_model_repository(tmp_path / "repo", ["cxr_opacity", "cxr_nodule"], others=["densenet_onnx", "cxr_preprocess"])
    (repo / "notes").mkdir()  # a folder without config.pbtxt is not a model
    (repo / "spaced").mkdir()
    (repo / "spaced" / "config.pbtxt").write_text('name: "spaced"\n  platform :  "ensemble"  # comment\n')
    assert list_ensembles(repo) == {"cxr_opacity", "cxr_nodule", "spaced"}
    with pytest.raises(FileNotFoundError):
        list_ensembles(tmp_path / "missing")


def test_tool_catalog_caches_for_its_ttl(tmp_path: Path) -> None:
    now = [0.0]
    repo = write_model_repository(tmp_path / "repo", ["cxr_opacity"])
    catalog = ToolCatalog(repo, ttl_seconds=60, clock=lambda: now[0])
    assert catalog.tools() == ({"cxr_opacity"}, None)
    write_model_repository(repo, ["cxr_nodule"])
    assert catalog.tools() == ({"cxr_opacity"}, None)  # cached
    now[0] = 61
    assert catalog.tools() == ({"cxr_opacity", "cxr_nodule"}, None)
    names, error = ToolCatalog(tmp_path / "missing", 0).tools()
    assert names is None and "not a folder" in error


def test_config_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOSMEDAI_OPERATOR_NAMESPACES", "mosmedai, mosmedai-staging")
    monkeypatch.setenv("MOSMEDAI_OPERATOR_PROMETHEUS_URL", "http://prometheus:9090")
    monkeypatch.setenv("MOSMEDAI_OPERATOR_METRICS_PORT", "")
    monkeypatch.setenv("MOSMEDAI_OPERATOR_SERVICE_MONITOR_LABELS", '{"release": "prometheus"}')
    config = OperatorConfig()
    assert config.namespaces == ["mosmedai", "mosmedai-staging"]
    assert str(config.prometheus_url) == "http://prometheus:9090/"
    assert config.metrics_port is None and config.service_monitor_labels == {"release": "prometheus"}


def test_bad_config_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOSMEDAI_OPERATOR_AUTOSCALE_INTERVAL_SECONDS", "0")
    with pytest.raises(ValidationError, match="autoscale_interval_seconds"):
        OperatorConfig()


def test_every_config_field_is_documented() -> None:
    for name, field in OperatorConfig.model_fields.items():
        assert field.description and len(field.description) > 20, name


def test_spec_problems_are_all_reported() -> None:
    spec = GpuPoolSpec.model_validate({
        "region": "RU-MOW", "timeZone": "Mars/Olympus", "tools": ["cxr_opacity", "x", "x"],
        "replicas": {"min": 5, "max": 3}, "targets": {"tolerancePercent": 5},
        "schedule": [{"start": "08:00", "end": "08:00", "minReplicas": 9}]})
    problems = semantic_problems(spec, {"cxr_opacity"})
    assert len(problems) == 7, problems
    assert validate({"region": "RU-MOW"}, None)[1] == ["spec.timeZone: Field required", "spec.tools: Field required",
                                                       "spec.targets: Field required"]


def test_triton_reads_the_pools_model_repository_or_the_operators(tmp_path: Path) -> None:
    from mosmedai_operator import children

    config = OperatorConfig(metrics_port=None, health_port=None, model_repository_path=tmp_path,
                            triton_model_repository="s3://mosmedai-models/model_repository")
    base = {"region": "RU-MOW", "timeZone": "Europe/Moscow", "tools": ["cxr_opacity"], "targets": {"queueTimeP95Ms": 200}}
    pool = {"apiVersion": "mosmedai.io/v1alpha1", "kind": "GpuPool",
            "metadata": {"name": "ru-mow", "namespace": "mosmedai", "uid": "00000000-0000-4000-8000-000000000001"}}

    def repositories(raw: dict) -> list[str]:
        spec = GpuPoolSpec.model_validate(raw)
        (deployment,) = [c for c in children.children({**pool, "spec": raw}, spec, config, replicas=1) if c["kind"] == "Deployment"]
        (triton,) = deployment["spec"]["template"]["spec"]["containers"]
        return [a for a in triton["args"] if a.startswith("--model-repository")]

    a100 = "s3://mosmedai-models/model_repository_gpu/nvidia-a100-sxm4-80gb/trt-10.8.0.43"
    assert repositories({**base, "gpu": {"product": "NVIDIA-A100-SXM4-80GB"}, "modelRepository": a100}) == [f"--model-repository={a100}"]
    assert repositories(base) == ["--model-repository=s3://mosmedai-models/model_repository"]
    assert GpuPoolSpec.model_validate(base).model_repository is None
    problems = validate({**base, "modelRepository": "ftp://x/models"}, None)[1]
    assert len(problems) == 1 and problems[0].startswith("spec.modelRepository:"), problems


def test_subset_and_merge_patch() -> None:
    desired = {"a": 1, "m": Owned({"x": "1"}), "gone": None, "list": [{"k": "v"}], "empty": []}
    actual = {"a": 1, "m": {"x": "1"}, "list": [{"k": "v", "default": True}], "extra": "kept"}
    assert is_subset(desired, actual)
    assert not is_subset(desired, {**actual, "m": {"x": "1", "y": "2"}})  # owned map with an extra key
    assert not is_subset(desired, {**actual, "gone": {"was": "here"}})
    assert not is_subset(desired, {**actual, "list": [{"k": "v"}, {"k": "w"}]})
    patch = merge_patch(desired, {**actual, "m": {"x": "0", "y": "2"}, "gone": 1})
    assert patch == {"a": 1, "m": {"x": "1", "y": None}, "gone": None, "list": [{"k": "v"}], "empty": []}
    assert strip_nones(desired) == {"a": 1, "m": {"x": "1"}, "list": [{"k": "v"}], "empty": []}


def test_conditions_keep_transition_times() -> None:
    t0 = datetime(2026, 3, 2, 8, 0, tzinfo=timezone.utc)
    first = merge_conditions(None, [condition("Ready", False, "ReplicasNotReady", "0/1")], t0, 1)
    same = merge_conditions(first, [condition("Ready", False, "ReplicasNotReady", "0/2")], t0 + timedelta(minutes=5), 2)
    assert same[0]["lastTransitionTime"] == "2026-03-02T08:00:00Z" and same[0]["observedGeneration"] == 2
    flipped = merge_conditions(same, [condition("Ready", True, "ReplicasReady", "2/2")], t0 + timedelta(minutes=9), 2)
    assert flipped[0]["lastTransitionTime"] == "2026-03-02T08:09:00Z"
    assert status_patch({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": None}) == {"b": 3}


def test_render_escapes_and_fills_placeholders() -> None:
    query = render('x{namespace="$namespace",gpupool="$pool",region="$region",model=~"$tools"} $unknown',
                   namespace="ns", pool='p"1', region="RU-MOW", tools=["a", "b"])
    assert query == 'x{namespace="ns",gpupool="p\\"1",region="RU-MOW",model=~"a|b"} $unknown'
