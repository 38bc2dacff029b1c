"""The GpuPool CRD: its schema accepts every example (operators/examples and the Helm
chart's rendered output, when there is a chart), rejects bad ones, agrees with the
operator's typed spec on defaults, and the operator's manifests pass Kubernetes' schemas."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from mosmedai_operator import children
from mosmedai_operator.config import OperatorConfig
from mosmedai_operator.spec import GpuPoolSpec, semantic_problems

ROOT = Path(__file__).resolve().parents[2]
OPERATORS = ROOT / "operators"
CRD_PATH = OPERATORS / "crds" / "gpupools.mosmedai.io.yaml"
CHART = ROOT / "charts" / "mosmedai"
K8S_VERSION = "1.32.0"  # kubernetes-validate schemas to check built-in kinds against


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return load_all(CRD_PATH)[0]


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: a missing property with a
    ``default`` gets it, then defaulting goes on inside (objects and array items)."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and schema.get("type") == "object":
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def validate(schema: dict[str, Any], obj: dict[str, Any]) -> None:
    # OpenAPI v3 schemas of CRDs are a subset of JSON Schema draft 4 plus x-kubernetes-*
    # extensions (ignored here, as unknown keywords); `format` is checked as the API server does.
    jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker()).validate(obj)


def rendered_chart_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    """Documents of the Helm chart rendered with each ci/*-values.yaml (and the defaults)."""
    if not (CHART / "Chart.yaml").exists():
        return
    cached = CHART.parents[1] / ".tools" / "helm"  # where `make` caches it (scripts/fetch-helm)
    helm = os.environ.get("HELM") or (str(cached) if cached.exists() else shutil.which("helm"))
    if not helm:
        pytest.fail("charts/mosmedai exists but there is no helm binary: run `make helm` or set $HELM")
    values = [None, *sorted((CHART / "ci").glob("*-values.yaml"))]
    for value_file in values:
        args = [helm, "template", "mosmedai", str(CHART)] + (["-f", str(value_file)] if value_file else [])
        output = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        for doc in yaml.safe_load_all(output):
            if doc:
                yield f"chart[{value_file.name if value_file else 'defaults'}]", doc


def example_pools() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(OPERATORS.rglob("*.yaml")):
        for doc in load_all(path):
            if doc.get("kind") == "GpuPool":
                found.append((str(path.relative_to(ROOT)), doc))
    return found


def test_there_are_examples() -> None:
    assert len(example_pools()) >= 3


@pytest.mark.parametrize("where,pool", example_pools(), ids=[w for w, _ in example_pools()])
def test_examples_pass_the_schema_and_the_operator(schema: dict[str, Any], where: str, pool: dict[str, Any]) -> None:
    validate(schema, pool)
    spec = GpuPoolSpec.model_validate(apply_defaults(schema, pool)["spec"])
    assert semantic_problems(spec, known_tools=None) == []


def test_chart_gpupools_pass_the_schema(schema: dict[str, Any]) -> None:
    checked = 0
    for where, doc in rendered_chart_documents():
        if doc.get("kind") == "GpuPool":
            validate(schema, doc)
            spec = GpuPoolSpec.model_validate(apply_defaults(schema, doc)["spec"])
            assert semantic_problems(spec, known_tools=None) == [], where
            checked += 1
        if doc.get("kind") == "CustomResourceDefinition" and doc["metadata"]["name"] == "gpupools.mosmedai.io":
            assert doc == load_all(CRD_PATH)[0], f"{where}: the chart's CRD differs from operators/crds"
    if not (CHART / "Chart.yaml").exists():
        pytest.skip("no charts/mosmedai yet: only operators/ examples were checked")


MINIMAL = {"region": "RU-KAM", "timeZone": "Asia/Kamchatka", "tools": ["cxr_opacity"], "targets": {"queueTimeP95Ms": 300}}

BAD_SPECS = [
    ("missing-region", {k: v for k, v in MINIMAL.items() if k != "region"}),
    ("missing-targets", {k: v for k, v in MINIMAL.items() if k != "targets"}),
    ("region-not-iso-3166-2", {**MINIMAL, "region": "Moscow"}),
    ("time-zone-not-a-name", {**MINIMAL, "timeZone": "+03:00"}),
    ("no-target-set", {**MINIMAL, "targets": {"tolerancePercent": 5}}),
    ("gpu-utilisation-above-100", {**MINIMAL, "targets": {"gpuUtilizationPercent": 150}}),
    ("queue-time-zero", {**MINIMAL, "targets": {"queueTimeP95Ms": 0}}),
    ("negative-gpu-count", {**MINIMAL, "gpu": {"count": -1}}),
    ("bad-resource-name", {**MINIMAL, "gpu": {"resourceName": "gpu"}}),
    ("max-zero", {**MINIMAL, "replicas": {"min": 0, "max": 0}}),
    ("max-above-256", {**MINIMAL, "replicas": {"max": 1000}}),
    ("replicas-as-string", {**MINIMAL, "replicas": {"max": "4"}}),
    ("no-tools", {**MINIMAL, "tools": []}),
    ("tool-name-upper-case", {**MINIMAL, "tools": ["CXR"]}),
    ("schedule-hour-25", {**MINIMAL, "schedule": [{"start": "25:00", "end": "20:00", "minReplicas": 1}]}),
    ("schedule-bad-day", {**MINIMAL, "schedule": [{"days": ["Funday"], "start": "08:00", "end": "20:00", "minReplicas": 1}]}),
    ("schedule-without-floor", {**MINIMAL, "schedule": [{"start": "08:00", "end": "20:00"}]}),
    ("toleration-bad-operator", {**MINIMAL, "tolerations": [{"key": "k", "operator": "Maybe"}]}),
    ("scale-down-step-zero", {**MINIMAL, "scaleDown": {"maxStep": 0}}),
    ("window-too-long", {**MINIMAL, "scaleDown": {"stabilizationWindowSeconds": 86400}}),
    ("service-monitor-bad-interval", {**MINIMAL, "serviceMonitor": {"enabled": True, "interval": "soon"}}),
    ("model-load-timeout-too-short", {**MINIMAL, "modelLoadTimeoutSeconds": 5}),
    ("model-repository-other-scheme", {**MINIMAL, "modelRepository": "ftp://models/model_repository"}),
    ("model-repository-relative-path", {**MINIMAL, "modelRepository": "model_repository"}),
    ("model-repository-with-space", {**MINIMAL, "modelRepository": "s3://mosmedai-models/model repository"}),
    ("model-repository-empty", {**MINIMAL, "modelRepository": ""}),
    ("model-repository-http-endpoint", {**MINIMAL, "modelRepository": "s3://http://minio:9000/models"}),
    ("model-repository-not-a-string", {**MINIMAL, "modelRepository": 42}),
    ("district-unknown", {**MINIMAL, "districts": ["Moscow"]}),
    ("districts-not-a-list", {**MINIMAL, "districts": "CFD"}),
    ("neighbour-not-a-pool-name", {**MINIMAL, "neighbours": ["RU_MOW"]}),
    ("neighbour-too-long", {**MINIMAL, "neighbours": ["a" * 64]}),
    ("too-many-neighbours", {**MINIMAL, "neighbours": [f"pool-{i}" for i in range(17)]}),
    ("transfer-negative", {**MINIMAL, "transferSeconds": -1}),
    ("transfer-above-600", {**MINIMAL, "transferSeconds": 601}),
]
ROUTING_FIELDS = ("districts", "neighbours", "transferSeconds")


@pytest.mark.parametrize("spec", [s for _, s in BAD_SPECS], ids=[i for i, _ in BAD_SPECS])
def test_bad_specs_are_rejected_by_the_schema(schema: dict[str, Any], spec: dict[str, Any]) -> None:
    pool = {"apiVersion": "mosmedai.io/v1alpha1", "kind": "GpuPool", "metadata": {"name": "bad"}, "spec": spec}
    with pytest.raises(jsonschema.ValidationError):
        validate(schema, pool)


@pytest.mark.parametrize("spec", [s for _, s in BAD_SPECS if set(s) & set(ROUTING_FIELDS)],
                         ids=[i for i, s in BAD_SPECS if set(s) & set(ROUTING_FIELDS)])
def test_typed_spec_rejects_what_the_schema_rejects_in_routing_fields(spec: dict[str, Any]) -> None:
    # Objects that never passed an API server (the emulator, the planner) meet the same bounds.
    with pytest.raises(ValidationError):
        GpuPoolSpec.model_validate(spec)


def test_routing_fields_keep_their_order_and_refuse_repeats(schema: dict[str, Any]) -> None:
    spec = GpuPoolSpec.model_validate({**MINIMAL, "districts": ["FEF", "SIB"], "neighbours": ["ru-tom", "ru-kam"],
                                       "transferSeconds": 0.25})
    assert (spec.districts, spec.neighbours, spec.transfer_seconds) == (["FEF", "SIB"], ["ru-tom", "ru-kam"], 0.25)
    assert semantic_problems(spec, None) == []
    twice = GpuPoolSpec.model_validate({**MINIMAL, "districts": ["FEF", "FEF"], "neighbours": ["ru-tom", "ru-tom"]})
    assert semantic_problems(twice, None) == ["spec.districts lists a district more than once",
                                              "spec.neighbours lists a pool more than once"]
    fields = schema["properties"]["spec"]["properties"]
    # The API server refuses repeats (list-type set) and keeps the order given.
    assert fields["districts"]["x-kubernetes-list-type"] == fields["neighbours"]["x-kubernetes-list-type"] == "set"


GOOD_MODEL_REPOSITORIES = [
    "s3://mosmedai-models/model_repository",
    "s3://mosmedai-models/model_repository_gpu/nvidia-a100-sxm4-80gb/trt-10.8.0.43",
    "s3://minio.storage.svc:9000/mosmedai-models/model_repository",
    "s3://https://s3.storage.example.org/mosmedai-models/model_repository/",
    "gs://mosmedai-models/model_repository",
    "as://mosmedai/models/model_repository",
    "/models",
]
BAD_MODEL_REPOSITORIES = [s["modelRepository"] for i, s in BAD_SPECS if i.startswith("model-repository") and isinstance(s["modelRepository"], str)]


def test_schema_and_typed_spec_agree_on_model_repository(schema: dict[str, Any]) -> None:
    """The CRD's pattern is the typed spec's, and both accept and reject the same values."""
    from mosmedai_operator.spec import MODEL_REPOSITORY_PATTERN

    assert schema["properties"]["spec"]["properties"]["modelRepository"]["pattern"] == MODEL_REPOSITORY_PATTERN
    assert BAD_MODEL_REPOSITORIES
    for value in GOOD_MODEL_REPOSITORIES:
        pool = {"apiVersion": "mosmedai.io/v1alpha1", "kind": "GpuPool", "metadata": {"name": "ok"},
                "spec": {**MINIMAL, "modelRepository": value}}
        validate(schema, pool)
        assert GpuPoolSpec.model_validate(pool["spec"]).model_repository == value
    for value in BAD_MODEL_REPOSITORIES:
        with pytest.raises(ValidationError):
            GpuPoolSpec.model_validate({**MINIMAL, "modelRepository": value})


def test_schema_and_typed_spec_agree_on_defaults(schema: dict[str, Any]) -> None:
    # The API server's defaults (from the CRD) and the operator's (pydantic) give the same spec.
    from_crd = GpuPoolSpec.model_validate(apply_defaults(schema, {"spec": MINIMAL})["spec"])
    from_model = GpuPoolSpec.model_validate(MINIMAL)
    assert from_crd == from_model
    window = {"start": "08:00", "end": "20:00", "minReplicas": 1}
    with_window = {**MINIMAL, "schedule": [window], "tolerations": [{"key": "k"}]}
    assert GpuPoolSpec.model_validate(apply_defaults(schema, {"spec": with_window})["spec"]) == GpuPoolSpec.model_validate(with_window)


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    """Every node has a type (Kubernetes' structural schema rule), bounds are ordered."""
    for path, node in walk(schema):
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            assert "type" in node, f"{path or '<root>'} has no type"
        if "minimum" in node and "maximum" in node:
            assert node["minimum"] <= node["maximum"], path
        if "default" in node:
            jsonschema.Draft4Validator({k: v for k, v in node.items() if k != "default"}).validate(node["default"])
        for branch in node.get("anyOf", []):
            assert set(branch) <= {"required"}, f"{path}: anyOf may only constrain, not type"


def test_print_columns_point_at_schema_fields(crd: dict[str, Any], schema: dict[str, Any]) -> None:
    (version,) = crd["spec"]["versions"]
    paths = {p for p, _ in walk(schema)}
    names = [column["name"] for column in version["additionalPrinterColumns"]]
    assert {"Region", "Ready", "Desired", "P95-Queue-ms", "Age"} <= set(names)
    for column in version["additionalPrinterColumns"]:
        json_path = column["jsonPath"].split("[?")[0]
        assert json_path == ".metadata.creationTimestamp" or json_path in paths, column


def test_status_conditions_cover_ready_scaling_degraded(schema: dict[str, Any]) -> None:
    status = schema["properties"]["status"]["properties"]
    assert status["conditions"]["items"]["properties"]["type"]["enum"] == ["Ready", "Scaling", "Degraded"]
    for field in ("observedGeneration", "replicas", "readyReplicas", "desiredReplicas", "lastScaleTime", "lastScaleReason"):
        assert field in status


@pytest.mark.parametrize("path", ["crds/gpupools.mosmedai.io.yaml", "crds/kopf-peering.yaml", "rbac.yaml"])
def test_manifests_pass_kubernetes_schemas(path: str) -> None:
    for doc in load_all(OPERATORS / path):
        if doc["apiVersion"].startswith("kopf.dev/"):
            continue  # a custom kind: checked by its own CRD in a cluster
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_generated_children_pass_kubernetes_schemas(tmp_path: Path) -> None:
    pool = {"apiVersion": "mosmedai.io/v1alpha1", "kind": "GpuPool",
            "metadata": {"name": "ru-mow", "namespace": "mosmedai", "uid": "0d8f1b7e-0000-4000-8000-000000000001"},
            "spec": load_all(OPERATORS / "examples" / "gpupool-moscow.yaml")[0]["spec"]}
    spec = GpuPoolSpec.model_validate(pool["spec"])
    config = OperatorConfig(metrics_port=None, health_port=None, model_repository_path=tmp_path)
    built = children.children(pool, spec, config, replicas=3)
    assert [c["kind"] for c in built] == ["Service", "PodDisruptionBudget", "ServiceMonitor", "Deployment"]
    for manifest in built:
        if manifest["kind"] == "ServiceMonitor":
            continue  # prometheus-operator's CRD, not a built-in kind
        kubernetes_validate.validate(children.strip_nones(manifest), K8S_VERSION, strict=True)


def test_rbac_grants_only_what_the_operator_uses() -> None:
    (role,) = [d for d in load_all(OPERATORS / "rbac.yaml") if d["kind"] == "ClusterRole"]
    granted = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}
    for kind, (api_version, plural) in children.CHILD_RESOURCES.items():
        group = api_version.rpartition("/")[0]
        assert {"get", "list", "watch", "create", "patch"} <= granted[(group, plural)], kind
        assert "update" not in granted[(group, plural)]
    assert "delete" not in granted[("apps", "deployments")]  # the garbage collector deletes children
    assert granted[("mosmedai.io", "gpupools/status")] == {"get", "patch"}
    assert all("*" not in verbs for verbs in granted.values())
    assert not any(resource in ("secrets", "pods", "nodes") for _, resource in granted)
    # Each rule has a comment saying why (the file is for humans to review).
    text = (OPERATORS / "rbac.yaml").read_text()
    rules_block = text.split("rules:")[1].split("---")[0]
    chunks = rules_block.split("  - apiGroups:")[:-1]
    assert all("#" in chunk for chunk in chunks), "every RBAC rule needs a comment above it"
