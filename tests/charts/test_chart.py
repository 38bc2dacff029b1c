"""The Helm chart charts/mosmedai, rendered by the real helm v4 binary.

Each scenario (the defaults and every ci/*-values.yaml) is linted with --strict and
rendered once per session; every rendered object is validated against the Kubernetes
schemas of a pinned version (kubernetes-validate) and every GpuPool against the operator's
CRD; policy tests check the secure defaults on every container; bad values must fail
`helm template` (what `helm install` runs) with a message that names the value.
"""
from __future__ import annotations

import copy
import json
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

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mosmedai"
OPERATOR_CRD = ROOT / "operators" / "crds" / "gpupools.mosmedai.io.yaml"
KOPF_CRDS = ROOT / "operators" / "crds" / "kopf-peering.yaml"
K8S_VERSION = "1.32.0"  # the Kubernetes version rendered objects are validated against
NAMESPACE = "mosmedai"
SCENARIOS = ["defaults", *sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))]
# Kinds that come from CRDs (not in kubernetes-validate's built-in schemas).
CUSTOM_KINDS = {"GpuPool", "RayService", "ServiceMonitor", "PodMonitor", "PrometheusRule", "KopfPeering"}
GPU_RESOURCE_SUFFIX = "/gpu"  # nvidia.com/gpu, amd.com/gpu...


def helm_binary() -> str:
    helm = os.environ.get("HELM") or str(ROOT / ".tools" / "helm")
    if not Path(helm).is_file():
        helm = shutil.which("helm") or ""
    if not helm:
        pytest.skip("no helm binary: `make helm` fetches it into .tools/helm (make test does it first)")
    return helm


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, check=check)


def values_args(scenario: str) -> list[str]:
    return [] if scenario == "defaults" else ["-f", str(CHART / "ci" / scenario)]


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every scenario rendered once (with the test hook, as `helm test` would create it)."""
    out = {}
    for scenario in SCENARIOS:
        result = helm("template", "mosmedai", str(CHART), "-n", NAMESPACE, *values_args(scenario))
        out[scenario] = load_all(result.stdout)
    return out


def docs_of(rendered, kind: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    for scenario, docs in rendered.items():
        for doc in docs:
            if kind is None or doc["kind"] == kind:
                yield scenario, doc


def pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template in an object."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(f"{kind}/{name}", doc["spec"]["template"]["spec"])]
    if kind == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        found = [(f"{kind}/{name}/head", cluster["headGroupSpec"]["template"]["spec"])]
        found += [(f"{kind}/{name}/{g['groupName']}", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
        return found
    return []


def all_pods(rendered) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for scenario, doc in docs_of(rendered):
        for where, spec in pod_specs(doc):
            yield f"{scenario}: {where}", doc, spec


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


# --- helm lint and render -------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(scenario: str) -> None:
    result = helm("lint", "--strict", str(CHART), *values_args(scenario), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_scenarios_exist() -> None:
    names = {p.name for p in (CHART / "ci").glob("*-values.yaml")}
    assert {"minimal-cpu-values.yaml", "three-gpu-regions-values.yaml", "kuberay-values.yaml",
            "airgapped-values.yaml", "monitoring-values.yaml", "integrators-values.yaml"} <= names


def test_helm_is_v4() -> None:
    assert helm("version", "--short").stdout.startswith("v4.")


# --- schemas ------------------------------------------------------------------------
def test_every_object_passes_the_kubernetes_schemas(rendered) -> None:
    checked = 0
    for scenario, doc in docs_of(rendered):
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{scenario}: {doc['kind']}/{doc['metadata']['name']}: {error}")
        checked += 1
    assert checked > 50


def test_kubernetes_validate_really_rejects() -> None:
    # The validator is not a no-op: an unknown field and a wrong type fail.
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": "eighty"}], "nonsense": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_only_known_custom_kinds(rendered) -> None:
    api = {"GpuPool": "mosmedai.io/v1alpha1", "RayService": "ray.io/v1", "ServiceMonitor": "monitoring.coreos.com/v1",
           "PodMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1",
           "KopfPeering": "kopf.dev/v1"}
    for scenario, doc in docs_of(rendered):
        if doc["kind"] in CUSTOM_KINDS:
            assert doc["apiVersion"] == api[doc["kind"]], f"{scenario}: {doc['kind']}"


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    (version,) = load_all(OPERATOR_CRD.read_text())[0]["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def test_every_gpupool_passes_the_crd_schema_and_the_operator(rendered, crd_schema) -> None:
    from mosmedai_operator.spec import GpuPoolSpec, semantic_problems

    pools = 0
    for scenario, doc in docs_of(rendered, "GpuPool"):
        jsonschema.Draft4Validator(crd_schema, format_checker=jsonschema.FormatChecker()).validate(doc)
        spec = GpuPoolSpec.model_validate(doc["spec"])
        assert semantic_problems(spec, known_tools=None) == [], scenario
        pools += 1
    assert pools >= 7


def test_chart_crds_are_the_operators() -> None:
    assert load_all((CHART / "crds" / "gpupools.mosmedai.io.yaml").read_text()) == load_all(OPERATOR_CRD.read_text())
    kopf_crds = [d for d in load_all(KOPF_CRDS.read_text()) if d["kind"] == "CustomResourceDefinition"]
    assert load_all((CHART / "crds" / "kopf-peering.yaml").read_text()) == kopf_crds
    for path in (CHART / "crds").glob("*.yaml"):
        for doc in load_all(path.read_text()):
            assert doc["kind"] == "CustomResourceDefinition", path  # crds/ holds CRDs only
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_one_gpupool_per_region(rendered) -> None:
    for scenario in SCENARIOS:
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        if scenario != "defaults":
            values.update(yaml.safe_load((CHART / "ci" / scenario).read_text()))
        pools = {d["spec"]["region"]: d for d in rendered[scenario] if d["kind"] == "GpuPool"}
        assert sorted(pools) == sorted(r["code"] for r in values["regions"]), scenario
        for region in values["regions"]:
            spec = pools[region["code"]]["spec"]
            assert spec["tools"] == region["tools"]
            assert spec.get("gpu", {}).get("product") == (region.get("gpu", {}).get("product") or None)
            assert spec.get("replicas") == region.get("replicas")
            assert spec.get("schedule", []) == region.get("schedule", [])
            assert spec.get("districts", []) == region.get("districts", [])
            assert spec.get("transferSeconds", 0) == region.get("transferSeconds", 0)
            # Neighbours are region codes in values, GpuPool names in the CRD.
            assert spec.get("neighbours", []) == [pools[code]["metadata"]["name"] for code in region.get("neighbours", [])]


def test_every_scenario_gives_the_router_a_pool_for_every_region_and_tool(rendered) -> None:
    """The rendered GpuPools, read as the router's pool discovery reads them, make a valid
    directory in which every region of the values has a home pool for every enabled tool."""
    from mosmedai.serving.pool_discovery import build_directory

    for scenario in SCENARIOS:
        docs = rendered[scenario]
        (gateway,) = [d for d in docs if d["kind"] in ("Deployment", "RayService")
                      and d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
        (_, spec), *_ = pod_specs(gateway)  # the router's pod (plain mode) or the Ray head
        tools = json.loads({e["name"]: e.get("value") for e in spec["containers"][0]["env"]}["MOSMEDAI_ENABLED_TOOLS"])
        gpupools = [d for d in docs if d["kind"] == "GpuPool"]
        directory, notes = build_directory(gpupools, NAMESPACE, tools)
        assert notes == [], f"{scenario}: {notes}"
        for pool in gpupools:
            for tool in tools:
                assert directory.home(pool["spec"]["region"], tool), f"{scenario}: {pool['spec']['region']} {tool}"
        values = yaml.safe_load((CHART / ("values.yaml" if scenario == "defaults" else f"ci/{scenario}")).read_text())
        tenants = {t["id"]: t["region"] for t in (values.get("tenants") or {}).get("items", [])}
        directory.check_regions(tenants)  # every tenant's region has a pool
    # The defaults' one pool serves every federal district: a tenant of any region has a pool.
    defaults, _ = build_directory([d for d in rendered["defaults"] if d["kind"] == "GpuPool"], NAMESPACE, ["cxr_opacity"])
    defaults.check_regions({"kamchatka": "RU-KAM", "kaliningrad": "RU-KGD", "tatarstan": "RU-TA"})
    # Three regions, two of them district pools: a region without a pool goes to its district's.
    directory, _ = build_directory([d for d in rendered["three-gpu-regions-values.yaml"] if d["kind"] == "GpuPool"],
                                   NAMESPACE, ["cxr_opacity", "cxr_nodule", "cxr_pneumothorax"])
    assert directory.home("RU-TUL", "cxr_opacity") == "ru-mow"  # Tula, Central district
    assert directory.home("RU-NVS", "cxr_opacity") == "ru-kam"  # Novosibirsk, Siberian district
    assert directory.home("RU-KGD", "cxr_pneumothorax") == "ru-mow"  # Kaliningrad's pool lacks it: its neighbour
    assert directory.candidates("RU-KAM", "cxr_opacity") == ("ru-kam", "ru-mow")


def test_values_yaml_passes_its_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))
    assert schema["additionalProperties"] is False


# --- policy: secure defaults ----------------------------------------------------------
def test_every_container_is_locked_down(rendered) -> None:
    for where, doc, spec in all_pods(rendered):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in containers(spec):
            name = f"{where}/{container['name']}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in sc["capabilities"], name
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
            assert sc.get("privileged", False) is False, name


def test_service_account_tokens_only_for_the_operator_and_the_router(rendered) -> None:
    # The gateway pods (plain mode) and the Ray pods (KubeRay mode) run the router, which
    # watches the GpuPools; every other workload has no token at all.
    api_users = {"operator": "mosmedai-operator", "gateway": "mosmedai-router"}
    for where, doc, spec in all_pods(rendered):
        user = api_users.get(doc["metadata"]["labels"]["app.kubernetes.io/component"])
        assert spec["automountServiceAccountToken"] is (user is not None), where
        if user:
            assert spec["serviceAccountName"] == user, where
    for scenario, doc in docs_of(rendered, "ServiceAccount"):
        user = doc["metadata"]["labels"]["app.kubernetes.io/component"] in ("operator", "router")
        assert doc["automountServiceAccountToken"] is user, f"{scenario}: {doc['metadata']['name']}"


def test_the_router_may_only_read_the_gpupools_of_its_namespace(rendered) -> None:
    for scenario in SCENARIOS:
        docs = rendered[scenario]
        (role,) = component(docs, "Role", "router")
        assert role["metadata"]["namespace"] == NAMESPACE
        assert role["rules"] == [{"apiGroups": ["mosmedai.io"], "resources": ["gpupools"], "verbs": ["get", "list", "watch"]}]
        (binding,) = component(docs, "RoleBinding", "router")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mosmedai-router", "namespace": NAMESPACE}]
        assert not component(docs, "ClusterRole", "router") and not component(docs, "ClusterRoleBinding", "router")


def test_every_container_has_requests_and_limits(rendered) -> None:
    for where, doc, spec in all_pods(rendered):
        for container in containers(spec):
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}/{container['name']} {kind}"


def is_engine_builder(doc: dict[str, Any]) -> bool:
    return doc["kind"] == "Job" and doc["metadata"]["labels"]["app.kubernetes.io/component"] == "engine-builder"


def test_gpus_only_for_triton_and_the_engine_builder(rendered) -> None:
    """GPUs go to Triton (the operator's pods, from GpuPool.spec.gpu) and to one exception
    the chart renders itself: the TensorRT engine-build Job. A TensorRT engine is compiled
    for the GPU it is built on (tactics timed on that product, tensorrt_build.py), so the
    build must run on a GPU of the pool's product: exactly one GPU, on a node of that
    product (nvidia.com/gpu.product), run to completion. Nothing else asks for a GPU."""
    builders = 0
    for where, doc, spec in all_pods(rendered):
        for container in containers(spec):
            for kind in ("requests", "limits"):
                gpus = {r: q for r, q in container["resources"].get(kind, {}).items() if r.endswith(GPU_RESOURCE_SUFFIX)}
                if is_engine_builder(doc):
                    assert list(gpus.values()) == ["1"], f"{where}/{container['name']} {kind}: {gpus}"
                else:
                    assert not gpus, f"{where}/{container['name']} asks for {gpus}"
        if is_engine_builder(doc):
            builders += 1
            assert spec["restartPolicy"] == "Never" and len(spec["containers"]) == 1, where
            product = doc["metadata"]["annotations"]["mosmedai.io/gpu-product"]
            assert spec["nodeSelector"]["nvidia.com/gpu.product"] == product, where
    assert builders >= 4


def test_triton_pods_the_operator_makes_get_the_gpus_and_a_model_loading_startup_probe(rendered, tmp_path) -> None:
    """The operator's own builder, fed the rendered GpuPools and the chart's operator env:
    GPU limits on the triton container only (count 0: none), a startup probe that waits at
    least modelLoadTimeoutSeconds, liveness and readiness probes, the chart's Triton image."""
    from mosmedai_operator import children
    from mosmedai_operator.config import OperatorConfig
    from mosmedai_operator.spec import GpuPoolSpec

    for scenario, docs in rendered.items():
        (operator,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]
        env = {e["name"]: e["value"] for e in operator["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
        config = OperatorConfig(
            metrics_port=None, health_port=None, model_repository_path=tmp_path,
            triton_image=env["MOSMEDAI_OPERATOR_TRITON_IMAGE"],
            triton_model_repository=env["MOSMEDAI_OPERATOR_TRITON_MODEL_REPOSITORY"],
            triton_model_repository_secret=env["MOSMEDAI_OPERATOR_TRITON_MODEL_REPOSITORY_SECRET"],
        )
        for pool in (d for d in docs if d["kind"] == "GpuPool"):
            pool = copy.deepcopy(pool)
            pool["metadata"]["uid"] = "00000000-0000-4000-8000-000000000001"
            spec = GpuPoolSpec.model_validate(pool["spec"])
            (deployment,) = [c for c in children.children(pool, spec, config, replicas=2) if c["kind"] == "Deployment"]
            (triton,) = deployment["spec"]["template"]["spec"]["containers"]
            limits = triton["resources"]["limits"]
            gpu = pool["spec"].get("gpu", {})
            if gpu.get("count", 1) > 0:
                assert limits[gpu.get("resourceName", "nvidia.com/gpu")] == str(gpu.get("count", 1)), scenario
            else:
                assert not any(r.endswith(GPU_RESOURCE_SUFFIX) for r in limits), scenario
            probe = triton["startupProbe"]
            assert probe["periodSeconds"] * probe["failureThreshold"] >= spec.model_load_timeout_seconds
            assert triton["livenessProbe"] and triton["readinessProbe"]
            assert triton["image"] == env["MOSMEDAI_OPERATOR_TRITON_IMAGE"]
            envfrom = [e["secretRef"]["name"] for e in triton["envFrom"]]
            assert envfrom == [env["MOSMEDAI_OPERATOR_TRITON_MODEL_REPOSITORY_SECRET"]]
            # The pool's own repository (spec.modelRepository), not the operator's default.
            assert f"--model-repository={pool['spec']['modelRepository']}" in triton["args"], scenario


def test_every_server_has_liveness_and_readiness_probes(rendered) -> None:
    for where, doc, spec in all_pods(rendered):
        if doc["kind"] == "Job":
            continue  # run-to-completion, not a server
        for container in spec["containers"]:
            assert "livenessProbe" in container and "readinessProbe" in container, f"{where}/{container['name']}"


def test_gateway_startup_probe_covers_ray_start(rendered) -> None:
    for scenario, doc in docs_of(rendered, "Deployment"):
        if doc["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            probe = container["startupProbe"]
            assert probe["periodSeconds"] * probe["failureThreshold"] >= 120, scenario


def test_every_deployment_with_more_than_one_replica_has_a_pdb(rendered) -> None:
    for scenario, docs in rendered.items():
        pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
        hpas = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
        for deployment in (d for d in docs if d["kind"] == "Deployment"):
            name = deployment["metadata"]["name"]
            most = hpas[name]["spec"]["maxReplicas"] if name in hpas else deployment["spec"]["replicas"]
            if most <= 1:
                continue
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            matching = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            assert matching, f"{scenario}: Deployment {name} may run {most} pods and has no PDB"


def images(rendered) -> Iterator[tuple[str, str]]:
    for where, doc, spec in all_pods(rendered):
        for container in containers(spec):
            yield where, container["image"]
            for env in container.get("env", []):
                if env["name"].endswith("_IMAGE"):
                    yield f"{where} env {env['name']}", env["value"]


def test_no_latest_and_every_image_pinned(rendered) -> None:
    for where, image in images(rendered):
        name, _, digest = image.partition("@")
        tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else ""
        assert tag or digest, f"{where}: {image} has neither tag nor digest"
        assert tag != "latest", f"{where}: {image}"


def test_airgapped_images_come_from_the_mirror_by_digest(rendered) -> None:
    found = list(images({"airgapped-values.yaml": rendered["airgapped-values.yaml"]}))
    assert len(found) >= 4
    for where, image in found:
        assert image.startswith("registry.mosmedai.local.processes:5000/") and "@sha256:" in image, f"{where}: {image}"
    for where, doc, spec in all_pods({"airgapped-values.yaml": rendered["airgapped-values.yaml"]}):
        assert spec["imagePullSecrets"] == [{"name": "mirror-pull"}], where
    # Credentials from the SRE's Secret: the chart renders none of its own.
    assert not [d for d in rendered["airgapped-values.yaml"] if d["kind"] == "Secret"]


def test_credentials_only_in_secrets(rendered) -> None:
    credentials = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    for where, doc, spec in all_pods(rendered):
        for container in containers(spec):
            for env in container.get("env", []):
                assert env["name"] not in credentials, f"{where}: {env['name']} in plain env"
    for scenario, doc in docs_of(rendered):
        if doc["kind"] == "ConfigMap":
            assert not credentials & set(doc.get("data", {})), scenario


# --- what each scenario deploys -------------------------------------------------------
def kinds(docs: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for doc in docs:
        counts[doc["kind"]] = counts.get(doc["kind"], 0) + 1
    return counts


def test_plain_mode_runs_the_serve_app_against_the_regions_triton(rendered, monkeypatch) -> None:
    docs = rendered["three-gpu-regions-values.yaml"]
    (gateway,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "mosmedai.local.processes", "serve"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The router watches the release namespace's GpuPools for its pools.
    assert (env["MOSMEDAI_POOL_DISCOVERY"], env["MOSMEDAI_POOL_NAMESPACE"]) == ("kubernetes", NAMESPACE)
    # The Open Inference Protocol passthrough calls the first region's pool: the operator
    # names the Triton Service like the pool; gRPC on 8001, HTTP on 8000.
    assert env["MOSMEDAI_TRITON_URL"] == f"ru-mow.{NAMESPACE}.svc:8001"
    assert env["MOSMEDAI_TRITON_HTTP_URL"] == f"http://ru-mow.{NAMESPACE}.svc:8000"
    assert env["MOSMEDAI_BIND_HOST"] == "0.0.0.0"
    assert json.loads(env["MOSMEDAI_ENABLED_TOOLS"]) == ["cxr_opacity", "cxr_nodule", "cxr_pneumothorax"]
    # Ray's worker niceness (15 by default) would starve the replicas behind the pod's others.
    assert (env["RAY_worker_niceness"], env["RAY_SERVE_THROUGHPUT_OPTIMIZED"]) == ("0", "1")
    # The platform's own settings class accepts every MOSMEDAI_* value the chart sets.
    from mosmedai.config import Settings

    for name, value in env.items():
        if name.startswith("MOSMEDAI_") and value is not None:  # None: from a Secret (valueFrom)
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert (settings.pool_discovery, settings.pool_namespace) == ("kubernetes", NAMESPACE)
    assert settings.triton_grpc_target == f"ru-mow.{NAMESPACE}.svc:8001"
    assert kinds(docs)["GpuPool"] == 3 and "HorizontalPodAutoscaler" in kinds(docs) and "Ingress" in kinds(docs)


def test_operator_env_is_valid_operator_config(rendered, monkeypatch) -> None:
    from mosmedai_operator.config import OperatorConfig

    for scenario, doc in docs_of(rendered, "Deployment"):
        if doc["metadata"]["labels"]["app.kubernetes.io/component"] != "operator":
            continue
        env = {e["name"]: e["value"] for e in doc["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
        fields = {k.removeprefix("MOSMEDAI_OPERATOR_").lower(): v for k, v in env.items() if k.startswith("MOSMEDAI_OPERATOR_")}
        assert set(fields) <= set(OperatorConfig.model_fields), scenario
        with monkeypatch.context() as patch:
            for name, value in env.items():
                if name.startswith("MOSMEDAI_OPERATOR_"):
                    patch.setenv(name, value)
            config = OperatorConfig()
        assert config.namespaces == [NAMESPACE]
        assert config.standalone is (doc["spec"]["replicas"] == 1)


def test_model_repository_uri_for_triton(rendered) -> None:
    def uri(scenario: str) -> str:
        (op,) = [d for d in rendered[scenario] if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]
        return {e["name"]: e.get("value") for e in op["spec"]["template"]["spec"]["containers"][0]["env"]}["MOSMEDAI_OPERATOR_TRITON_MODEL_REPOSITORY"]

    # No GPU product named: no engines, the cpu (ONNX) repository.
    assert uri("defaults") == "s3://mosmedai-models/model_repository"
    assert uri("monitoring-values.yaml") == "s3://https://s3.storage.example.org/mosmedai-models/model_repository"
    # Triton: plain HTTP to a custom endpoint unless the host is prefixed with https://. One
    # region of one product: every pool reads that product's TensorRT repository.
    assert uri("airgapped-values.yaml") == \
        "s3://minio.storage.svc:9000/mosmedai-models/model_repository_gpu/nvidia-a100-pcie-40gb/trt-10.8.0.43"
    # Three products: each pool names its own in spec.modelRepository; the operator's
    # fallback is the cpu one, which every pool can load.
    assert uri("three-gpu-regions-values.yaml") == "s3://mosmedai-models/model_repository"


def test_kuberay_scenario_renders_a_rayservice_instead_of_the_gateway_deployment(rendered) -> None:
    docs = rendered["kuberay-values.yaml"]
    (ray,) = [d for d in docs if d["kind"] == "RayService"]
    serve = yaml.safe_load(ray["spec"]["serveConfigV2"])
    assert serve["applications"][0]["import_path"] == "mosmedai.ingress.app:app_from_env"
    assert not [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
    head_labels = ray["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= head_labels.items()
    workers = ray["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    for group in (ray["spec"]["rayClusterConfig"]["headGroupSpec"], workers):
        (container,) = group["template"]["spec"]["containers"]
        assert {"name": "RAY_worker_niceness", "value": "0"} in container["env"]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (2, 6)


def test_network_policies_expose_only_the_gateway_grpc_and_dimse(rendered) -> None:
    """From outside the namespace: the gateway's port (study API, DICOMweb), the gRPC
    front door's and the DIMSE port, each on its own pods only."""
    public = {"gateway": 8000, "grpc-public": 9000, "dimse": 11112}
    for scenario in ("monitoring-values.yaml", "kuberay-values.yaml", "integrators-values.yaml"):
        policies = [d for d in rendered[scenario] if d["kind"] == "NetworkPolicy"]
        assert policies, scenario
        gateway_port = 8000
        opened = set()
        for policy in policies:
            for rule in policy["spec"]["ingress"]:
                peers = rule.get("from")
                if peers == [{"podSelector": {}}]:
                    continue  # same namespace
                selector = policy["spec"]["podSelector"].get("matchLabels", {})
                if peers is None:  # from anywhere: the public ports only, each on its own pods
                    component = selector.get("app.kubernetes.io/component")
                    # the gRPC door is the gateway pods' second port, under a policy of its own
                    door = "grpc-public" if policy["metadata"]["name"].endswith("-grpc-public") else component
                    assert door in public and component in ("gateway", "dimse"), policy["metadata"]["name"]
                    assert [p["port"] for p in rule["ports"]] == [public[door]]
                    opened.add(door)
                else:  # from one named namespace (Prometheus, KubeRay): named ports only
                    (peer,) = peers
                    assert set(peer) == {"namespaceSelector"}
                    assert rule["ports"] and all(p["port"] != gateway_port or selector for p in rule["ports"])
        expected = {"gateway", "grpc-public"} | ({"dimse"} if scenario == "integrators-values.yaml" else set())
        assert opened == expected, scenario


def test_monitoring_scenario(rendered) -> None:
    docs = rendered["monitoring-values.yaml"]
    counts = kinds(docs)
    assert counts["ServiceMonitor"] == 1 and counts["PodMonitor"] == 1 and counts["KopfPeering"] == 1
    for pool in (d for d in docs if d["kind"] == "GpuPool"):
        assert pool["spec"]["serviceMonitor"] == {"enabled": True, "interval": "30s"}
    for monitor in (d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor")):
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # Rules and dashboards come from charts/mosmedai/files (the observability work): when
    # those files exist, the PrometheusRule and the ConfigMap carry them; else none renders.
    rule_files = sorted((CHART / "files" / "prometheus" / "rules").glob("*.y*ml"))
    dashboards = sorted((CHART / "files" / "grafana").glob("*.json"))
    assert ("PrometheusRule" in counts) == bool(rule_files)
    assert ("ConfigMap" in counts) == bool(dashboards)


def test_rules_and_dashboards_are_picked_up_from_files(tmp_path: Path) -> None:
    """A copy of the chart with one rule file and one dashboard: both are rendered."""
    chart = tmp_path / "mosmedai"
    shutil.copytree(CHART, chart)
    rules, grafana = chart / "files" / "prometheus" / "rules", chart / "files" / "grafana"
    rules.mkdir(parents=True, exist_ok=True)
    grafana.mkdir(parents=True, exist_ok=True)
    rule = {"groups": [{"name": "zz-test", "rules": [{"alert": "ZzTest", "expr": "vector(1) > 2",
                                                       "annotations": {"summary": "{{ $labels.region }} test"}}]}]}
    (rules / "zz-test.yml").write_text(yaml.safe_dump(rule))
    (grafana / "zz-test.json").write_text(json.dumps({"title": "zz test", "panels": []}))
    out = load_all(helm("template", "mosmedai", str(chart), "-n", NAMESPACE,
                        "-f", str(CHART / "ci" / "monitoring-values.yaml")).stdout)
    (prometheus_rule,) = [d for d in out if d["kind"] == "PrometheusRule"]
    assert {"name": "zz-test", "rules": rule["groups"][0]["rules"]} in prometheus_rule["spec"]["groups"]
    (dashboards,) = [d for d in out if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    assert json.loads(dashboards["data"]["zz-test.json"])["title"] == "zz test"
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    for doc in (prometheus_rule, dashboards):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True) if doc["kind"] == "ConfigMap" else None


def test_helm_test_hook_sends_a_study(rendered) -> None:
    for scenario, docs in rendered.items():
        (job,) = [d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
        assert job["kind"] == "Job"
        script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
        compile(script, "helm-test", "exec")  # the Python the Job runs is at least valid
        assert "/v1/studies" in script and "findings" in script


def test_minimal_cpu_scenario(rendered) -> None:
    docs = rendered["minimal-cpu-values.yaml"]
    (pool,) = [d for d in docs if d["kind"] == "GpuPool"]
    assert pool["spec"]["gpu"]["count"] == 0
    assert "PodDisruptionBudget" not in kinds(docs)  # one replica each: a PDB would block drains


# --- bad values fail at install time with the value's name ----------------------------
def tenant(**changes: Any) -> dict[str, Any]:
    base = {"id": "kazan-rkb", "region": "RU-TA", "institution": "RKB", "token_sha256": "a" * 64}
    return {**base, **changes}


def region(**changes: Any) -> dict[str, Any]:
    base = {"code": "RU-MOW", "timeZone": "Europe/Moscow", "tools": ["cxr_opacity"],
            "targets": {"queueTimeP95Ms": 200}, "replicas": {"min": 1, "max": 4}}
    return {**base, **changes}


# (id, values file content, what the error must name). Files, not --set: --set on a list
# index replaces the whole entry (Helm's documented behaviour) and would test something else.
BAD_VALUES = [
    ("wrong-type", {"gateway": {"replicas": "two"}}, "gateway/replicas"),
    ("wrong-type-bool", {"networkPolicy": {"enabled": "yes"}}, "networkPolicy/enabled"),
    ("wrong-type-list", {"gateway": {"enabledTools": "cxr_nodule"}}, "gateway/enabledTools"),
    ("unknown-top-level-key", {"replicaCount": 3}, "replicaCount"),
    ("region-not-iso-3166-2", {"regions": [region(code="Moscow")]}, "regions/0/code"),
    ("region-lower-case", {"regions": [region(code="ru-mow")]}, "regions/0/code"),
    ("replicas-min-above-max", {"regions": [region(replicas={"min": 5, "max": 2})]}, "regions[0].replicas.min"),
    ("second-region-min-above-max", {"regions": [region(), region(code="RU-KAM", timeZone="Asia/Kamchatka",
                                                            replicas={"min": 3, "max": 1})]},
     "regions[1].replicas.min"),
    ("hpa-min-above-max", {"gateway": {"autoscaling": {"minReplicas": 8, "maxReplicas": 4}}},
     "gateway.autoscaling.minReplicas"),
    ("schedule-floor-above-max", {"regions": [region(schedule=[{"start": "08:00", "end": "20:00", "minReplicas": 6}])]},
     "regions[0].schedule[0].minReplicas"),
    ("duplicate-region", {"regions": [region(), region()]}, "regions[1]"),
    ("latest-tag", {"images": {"gateway": {"tag": "latest"}}}, "images/gateway/tag"),
    ("unknown-key-in-region", {"regions": [region(gpus=2)]}, "regions/0"),
    ("gpu-count-too-high", {"regions": [region(gpu={"count": 64})]}, "regions/0/gpu/count"),
    # Values merge onto the defaults: null is how a user removes a default (Helm docs).
    ("container-without-limits", {"gateway": {"resources": {"limits": None}}},
     "gateway/resources"),
    # gateway.tritonRegion is gone: the router watches every pool (an old values file fails loudly).
    ("gateway-triton-region-gone", {"gateway": {"tritonRegion": "RU-MOW"}}, "tritonRegion"),
    ("neighbour-not-deployed", {"regions": [region(neighbours=["RU-KAM"])]}, "regions[0].neighbours"),
    ("neighbour-itself", {"regions": [region(), region(code="RU-TA", timeZone="Europe/Moscow", neighbours=["RU-TA"])]},
     "regions[1].neighbours"),
    ("neighbour-lower-case", {"regions": [region(neighbours=["ru-kam"])]}, "regions/0/neighbours/0"),
    ("neighbour-twice", {"regions": [region(), region(code="RU-TA", timeZone="Europe/Moscow",
                                                      neighbours=["RU-MOW", "RU-MOW"])]}, "regions/1/neighbours"),
    ("district-unknown", {"regions": [region(districts=["Moscow"])]}, "regions/0/districts/0"),
    ("transfer-above-600", {"regions": [region(transferSeconds=900)]}, "regions/0/transferSeconds"),
    ("tenant-token-not-sha256", {"tenants": {"items": [tenant(token_sha256="abc123")]}},
     "tenants/items/0/token_sha256"),
    ("tenant-token-upper-case-hex", {"tenants": {"items": [tenant(token_sha256="A" * 64)]}},
     "tenants/items/0/token_sha256"),
    ("tenant-plain-token", {"tenants": {"items": [tenant(token="secret")]}}, "tenants/items/0"),
    ("tenant-called-ae-too-long", {"tenants": {"items": [tenant(dimse={"called_ae_title": "MOSMEDAI_KAZAN_RKB",
                                                                     "allowed_calling_aes": ["RKB_PACS"]})]}},
     "tenants/items/0/dimse/called_ae_title"),
    ("tenant-calling-ae-too-long", {"tenants": {"items": [tenant(dimse={"called_ae_title": "MOSMEDAI",
                                                                      "allowed_calling_aes": ["A" * 17]})]}},
     "tenants/items/0/dimse/allowed_calling_aes/0"),
    ("tenant-result-ae-backslash", {"tenants": {"items": [tenant(dimse={
        "called_ae_title": "MOSMEDAI", "allowed_calling_aes": ["PACS"],
        "result_destination": {"ae_title": "PA\\CS", "host": "10.0.0.1", "port": 104}})]}},
     "tenants/items/0/dimse/result_destination/ae_title"),
    ("tenant-duplicate-called-ae", {"tenants": {"items": [
        tenant(dimse={"called_ae_title": "MOSMEDAI", "allowed_calling_aes": ["A"]}),
        tenant(id="other", token_sha256="b" * 64, dimse={"called_ae_title": "MOSMEDAI", "allowed_calling_aes": ["B"]})]}},
     "tenants.items[1].dimse.called_ae_title"),
    ("tenant-duplicate-token", {"tenants": {"items": [tenant(), tenant(id="other")]}}, "tenants.items[1].token_sha256"),
    ("tenants-secret-and-items", {"tenants": {"existingSecret": "mine", "items": [tenant()]}}, "tenants.existingSecret"),
    ("demo-tenants-through-gateway-env", {"gateway": {"extraEnv": {"MOSMEDAI_DEMO_TENANTS": "true"}}},
     "gateway.extraEnv.MOSMEDAI_DEMO_TENANTS"),
    ("local-profile-through-dimse-env", {"dimse": {"extraEnv": {"MOSMEDAI_PROFILE": "local"}}},
     "dimse.extraEnv.MOSMEDAI_PROFILE"),
    ("demo-tenants-key", {"tenants": {"demo": True}}, "tenants"),
    ("dimse-replicas-without-affinity", {"dimse": {"enabled": True, "replicas": 2}}, "dimse.replicas"),
    ("dimse-bad-service-type", {"dimse": {"service": {"type": "ExternalName"}}}, "dimse/service/type"),
    ("tensorrt-version-not-a-version", {"tensorrt": {"version": "latest"}}, "tensorrt/version"),
    ("half-credentials", {"objectStorage": {"accessKeyId": "AKIA"}}, "objectStorage.accessKeyId"),
    ("tool-choice-region-not-iso", {"toolChoice": {"config": {"regions": {"Moscow": {}}}}}, "toolChoice/config/regions"),
    ("tool-choice-version-zero", {"toolChoice": {"config": {"defaults": {"versions": {"cxr_opacity": 0}}}}},
     "toolChoice/config/defaults/versions/cxr_opacity"),
    ("tool-choice-unknown-key", {"toolChoice": {"config": {"region": {}}}}, "toolChoice/config"),
]


@pytest.mark.parametrize("values,named", [(v, n) for _, v, n in BAD_VALUES], ids=[i for i, _, _ in BAD_VALUES])
def test_bad_values_fail_with_the_values_name(values: dict[str, Any], named: str, tmp_path: Path) -> None:
    path = tmp_path / "bad-values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm("template", "mosmedai", str(CHART), "-n", NAMESPACE, "-f", str(path), check=False)
    assert result.returncode != 0, f"rendered although bad: {values}"
    assert named in result.stderr, result.stderr


def test_publisher_job_is_renamed_when_its_template_changes(tmp_path: Path) -> None:
    """A Job's pod template is immutable: an upgrade that changes it must bring a new name,
    and an upgrade that changes nothing must keep it (no needless re-run)."""
    def job_name(*args: str) -> str:
        out = load_all(helm("template", "mosmedai", str(CHART), "-n", NAMESPACE, *args).stdout)
        (job,) = [d for d in out if d["kind"] == "Job" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "model-publisher"]
        return job["metadata"]["name"]

    base = job_name()
    assert base == job_name("--set", "gateway.replicas=3")
    assert base != job_name("--set", "images.modelPublisher.tag=0.1.1")
    assert base != job_name("--set", "objectStorage.bucket=other-bucket")
    assert base != job_name("--set", "modelRepository.publish.resources.limits.memory=1Gi")


def test_prometheus_rule_carries_every_rule_file_group(rendered) -> None:
    """The observability rule files (when present) reach the PrometheusRule whole: the same
    groups, each a name and rules that record or alert on an expression."""
    files = sorted((CHART / "files" / "prometheus" / "rules").glob("*.y*ml"))
    if not files:
        pytest.skip("no rule files in charts/mosmedai/files/prometheus/rules yet")
    expected = [group for path in files for group in yaml.safe_load(path.read_text())["groups"]]
    (rule,) = [d for d in rendered["monitoring-values.yaml"] if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == expected
    names = [group["name"] for group in expected]
    assert len(names) == len(set(names)), "rule group names must be unique within one PrometheusRule"
    for group in expected:
        for entry in group["rules"]:
            assert ("record" in entry) != ("alert" in entry) and entry["expr"], entry


# --- TensorRT engines per GPU product --------------------------------------------------
def component(docs: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["labels"]["app.kubernetes.io/component"] == name]


def test_one_engine_build_job_per_gpu_product(rendered) -> None:
    docs = rendered["three-gpu-regions-values.yaml"]
    jobs = {j["metadata"]["annotations"]["mosmedai.io/gpu-product"]: j for j in component(docs, "Job", "engine-builder")}
    assert sorted(jobs) == ["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3", "NVIDIA-L4"]
    a100 = jobs["NVIDIA-A100-SXM4-80GB"]["spec"]["template"]["spec"]
    # Placed like the first region of the product: its nodeSelector and tolerations too.
    assert a100["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "mosmedai.io/gpu-pool": "inference"}
    assert a100["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (container,) = a100["containers"]
    assert container["image"].startswith("mosmedai/engine-builder:")
    script = container["command"][-1]
    assert "python -m mosmedai.serving.tensorrt_build build --out /tmp/repository" in script
    assert "--tools cxr_opacity cxr_nodule cxr_pneumothorax" in script
    assert "--prefix=model_repository_gpu/nvidia-a100-sxm4-80gb/trt-10.8.0.43" in script
    assert "tensorrt.__version__" in script  # refuses an image of another TensorRT
    assert "--tools cxr_opacity cxr_nodule\n" in jobs["NVIDIA-H100-80GB-HBM3"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert container["envFrom"] == [{"secretRef": {"name": "mosmedai-object-storage"}}]
    # Each pool reads the repository of its own product (spec.modelRepository): three
    # products, three repositories, and the operator gives each pool's Triton its own.
    from mosmedai_operator import children
    from mosmedai_operator.config import OperatorConfig
    from mosmedai_operator.spec import GpuPoolSpec

    config = OperatorConfig(metrics_port=None, health_port=None)
    repositories = set()
    for pool in (d for d in docs if d["kind"] == "GpuPool"):
        slug = pool["spec"]["gpu"]["product"].lower()
        expected = f"s3://mosmedai-models/model_repository_gpu/{slug}/trt-10.8.0.43"
        assert pool["spec"]["modelRepository"] == expected
        assert "mosmedai.io/model-repository" not in pool["metadata"].get("annotations", {})
        args = children.triton_args(GpuPoolSpec.model_validate(pool["spec"]), config)
        assert f"--model-repository={expected}" in args
        repositories.add(expected)
    assert len(repositories) == 3
    # No product, or a CPU pool: no engines, the cpu repository.
    for scenario in ("defaults", "minimal-cpu-values.yaml"):
        assert not component(rendered[scenario], "Job", "engine-builder"), scenario
        (pool,) = [d for d in rendered[scenario] if d["kind"] == "GpuPool"]
        assert pool["spec"]["modelRepository"].endswith("/model_repository")


def test_engine_build_regions_of_one_product_share_a_job_and_cpu_pools_get_none(tmp_path: Path) -> None:
    values = {"regions": [
        region(gpu={"count": 1, "product": "NVIDIA-L4"}, tools=["cxr_opacity"]),
        region(code="RU-KAM", timeZone="Asia/Kamchatka", gpu={"count": 1, "product": "NVIDIA-L4"}, tools=["cxr_nodule"]),
        region(code="RU-KGD", timeZone="Europe/Kaliningrad", gpu={"count": 0, "product": "NVIDIA-L4"}),
    ]}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    docs = load_all(helm("template", "mosmedai", str(CHART), "-n", NAMESPACE, "-f", str(path)).stdout)
    (job,) = component(docs, "Job", "engine-builder")
    assert "--tools cxr_opacity cxr_nodule\n" in job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    pools = {p["spec"]["region"]: p["spec"]["modelRepository"] for p in docs if p["kind"] == "GpuPool"}
    assert pools["RU-MOW"] == pools["RU-KAM"] == "s3://mosmedai-models/model_repository_gpu/nvidia-l4/trt-10.8.0.43"
    assert pools["RU-KGD"] == "s3://mosmedai-models/model_repository"  # gpu.count 0: CPU pool, ONNX
    # Mixed repositories: the operator keeps the cpu one for every pool.
    (op,) = component(docs, "Deployment", "operator")
    env = {e["name"]: e.get("value") for e in op["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MOSMEDAI_OPERATOR_TRITON_MODEL_REPOSITORY"] == "s3://mosmedai-models/model_repository"
    off = load_all(helm("template", "mosmedai", str(CHART), "-n", NAMESPACE, "-f", str(path),
                        "--set", "tensorrt.enabled=false").stdout)
    assert not component(off, "Job", "engine-builder")


def test_engine_build_job_is_renamed_when_its_template_changes() -> None:
    def name(*args: str) -> str:
        out = load_all(helm("template", "mosmedai", str(CHART), "-n", NAMESPACE,
                            "-f", str(CHART / "ci" / "integrators-values.yaml"), *args).stdout)
        (job,) = component(out, "Job", "engine-builder")
        return job["metadata"]["name"]

    base = name()
    assert base == name("--set", "gateway.replicas=3")
    assert base != name("--set", "tensorrt.fp16=false")
    assert base != name("--set", "tensorrt.version=10.8.0.44")
    assert len(base) <= 63


# --- integrators: DIMSE, gRPC, DICOMweb, tenants -------------------------------------------
PLATFORM_COMPONENTS = ("gateway", "dimse")


def platform_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        if doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") not in PLATFORM_COMPONENTS:
            continue
        for where, spec in pod_specs(doc):
            for container in spec["containers"]:
                yield f"{where}/{container['name']}", spec, container


def test_every_platform_pod_runs_the_cluster_profile_without_demo_tenants(rendered) -> None:
    seen = 0
    for scenario, docs in rendered.items():
        for where, spec, container in platform_containers(docs):
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["MOSMEDAI_PROFILE"] == "cluster", f"{scenario}: {where}"
            assert env["MOSMEDAI_DEMO_TENANTS"] == "false", f"{scenario}: {where}"
            assert env["MOSMEDAI_TENANTS_FILE"] == "/etc/mosmedai/tenants/tenants.yaml"
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tenants"]
            assert mount == {"name": "tenants", "mountPath": "/etc/mosmedai/tenants", "readOnly": True}
            (volume,) = [v for v in spec["volumes"] if v["name"] == "tenants"]
            assert volume["secret"]["items"][0]["path"] == "tenants.yaml"
            seen += 1
    assert seen >= 9  # the gateway (plain and KubeRay pods, which also serve gRPC) and DIMSE of every scenario


def test_platform_env_is_valid_settings(rendered, monkeypatch) -> None:
    """Every MOSMEDAI_* name the chart sets is a Settings field, and the values parse."""
    from mosmedai.config import Settings

    for scenario, docs in rendered.items():
        for where, spec, container in platform_containers(docs):
            env = container["env"]
            fields = {e["name"].removeprefix("MOSMEDAI_").lower() for e in env if e["name"].startswith("MOSMEDAI_")}
            assert fields <= set(Settings.model_fields), f"{scenario}: {where}: {fields - set(Settings.model_fields)}"
            with monkeypatch.context() as patch:
                for e in env:
                    if e["name"].startswith("MOSMEDAI_"):
                        patch.setenv(e["name"], e.get("value") if "value" in e else "from-a-secret")
                Settings()


def test_integrators_scenario(rendered, tmp_path: Path) -> None:
    from mosmedai.ingress.tenants import load_tenants

    docs = rendered["integrators-values.yaml"]
    (dimse,) = component(docs, "Deployment", "dimse")
    spec = dimse["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "mosmedai.ingress.dimse"] and dimse["spec"]["replicas"] == 1
    env = {e["name"]: e for e in container["env"]}
    assert env["MOSMEDAI_DIMSE_PORT"]["value"] == "11112"
    assert env["MOSMEDAI_GATEWAY_URL"]["value"] == f"http://mosmedai-gateway.{NAMESPACE}.svc:80"
    assert env["MOSMEDAI_S3_ENDPOINT_URL"]["value"] == "http://minio.storage.svc:9000"
    assert env["MOSMEDAI_INCOMING_BUCKET"]["value"] == "rkb-incoming"
    assert env["MOSMEDAI_RETENTION_S"]["value"] == "259200"
    assert env["MOSMEDAI_DEID_UID_SECRET"]["valueFrom"] == {"secretKeyRef": {"name": "mosmedai-deid", "key": "uid-secret"}}
    assert container["envFrom"] == [{"secretRef": {"name": "mosmedai-s3"}}]
    assert container["readinessProbe"]["tcpSocket"] == {"port": "dimse"}
    (service,) = component(docs, "Service", "dimse")
    assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["ports"][0]["port"] == 11112
    assert service["spec"]["loadBalancerSourceRanges"] == ["10.20.0.0/16", "10.30.0.0/16"]
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    # gRPC: no pods of its own; its Service 9000 selects the gateway's pods, which open the port
    # and reach the region's Triton.
    assert not component(docs, "Deployment", "grpc") and not component(docs, "PodDisruptionBudget", "grpc")
    (gservice,) = component(docs, "Service", "grpc")
    assert gservice["spec"]["ports"][0]["port"] == 9000 and gservice["spec"]["ports"][0]["targetPort"] == 9000
    (gateway,) = component(docs, "Deployment", "gateway")
    assert gservice["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
    gw = gateway["spec"]["template"]["spec"]["containers"][0]
    genv = {e["name"]: e.get("value") for e in gw["env"]}
    assert genv["MOSMEDAI_TRITON_URL"] == f"ru-ta.{NAMESPACE}.svc:8001" and genv["MOSMEDAI_GRPC_PORT"] == "9000"
    assert {"name": "grpc", "containerPort": 9000, "protocol": "TCP"} in gw["ports"]
    # The gateway: the jobs' object store and credentials.
    (gateway,) = component(docs, "Deployment", "gateway")
    gw = gateway["spec"]["template"]["spec"]["containers"][0]
    assert gw["envFrom"] == [{"secretRef": {"name": "mosmedai-s3"}}]
    assert {"MOSMEDAI_S3_ENDPOINT_URL", "MOSMEDAI_RESULTS_BUCKET", "MOSMEDAI_DEID_UID_SECRET"} <= {e["name"] for e in gw["env"]}
    # DICOMweb through the Ingress, on the gateway Service.
    (ingress,) = [d for d in docs if d["kind"] == "Ingress"]
    paths = {p["path"]: p["backend"]["service"]["name"] for p in ingress["spec"]["rules"][0]["http"]["paths"]}
    assert paths == {"/dicomweb": "mosmedai-gateway", "/": "mosmedai-gateway"}
    # The tenants Secret is what the platform's own loader accepts in the cluster profile.
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "tenants"]
    mounted = tmp_path / "tenants.yaml"  # as the pods read it: a file
    mounted.write_text(secret["stringData"]["tenants.yaml"])
    assert load_tenants(str(mounted), "cluster", False) is not None
    assert len(yaml.safe_load(secret["stringData"]["tenants.yaml"])) == 3
    # The deid key comes from the SREs' Secret: the chart renders none.
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "deid"]
    # helm test sends a tenant's token.
    (test,) = [d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    tenv = {e["name"]: e for e in test["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert tenv["MOSMEDAI_TEST_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "mosmedai-test-token", "key": "token"}


def test_default_tenants_secret_is_an_empty_list_and_deid_key_is_generated(rendered, tmp_path: Path) -> None:
    from mosmedai.ingress.tenants import TenantConfigError, load_tenants

    docs = rendered["defaults"]
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "tenants"]
    assert yaml.safe_load(secret["stringData"]["tenants.yaml"]) == []
    # No tenants: the platform refuses to start and says why (NOTES.txt warns at install).
    mounted = tmp_path / "tenants.yaml"
    mounted.write_text(secret["stringData"]["tenants.yaml"])
    with pytest.raises(TenantConfigError, match="no tenants configured"):
        load_tenants(str(mounted), "cluster", False)
    (deid,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "deid"]
    assert deid["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(deid["data"]["deid-uid-secret"]) >= 48
    assert not component(docs, "Deployment", "dimse")  # DIMSE is opt-in


def test_dimse_service_types(tmp_path: Path) -> None:
    for service, expected in (({"type": "ClusterIP"}, None),
                              ({"type": "NodePort", "nodePort": 31112}, 31112)):
        out = load_all(helm("template", "mosmedai", str(CHART), "-n", NAMESPACE, "--set", "dimse.enabled=true",
                            *[a for k, v in service.items() for a in ("--set", f"dimse.service.{k}={v}")]).stdout)
        (svc,) = component(out, "Service", "dimse")
        assert svc["spec"]["type"] == service["type"]
        assert svc["spec"]["ports"][0].get("nodePort") == expected
        assert "externalTrafficPolicy" not in svc["spec"] or service["type"] != "ClusterIP"
        for doc in out:
            if doc["kind"] not in CUSTOM_KINDS:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # More than one DIMSE pod: sticky sessions and a PDB.
    out = load_all(helm("template", "mosmedai", str(CHART), "-n", NAMESPACE, "--set", "dimse.enabled=true",
                        "--set", "dimse.replicas=2", "--set", "dimse.service.sessionAffinity=ClientIP").stdout)
    assert component(out, "PodDisruptionBudget", "dimse")
    (svc,) = component(out, "Service", "dimse")
    assert svc["spec"]["sessionAffinity"] == "ClientIP"


def test_the_tool_choice_is_a_configmap_mounted_where_the_platform_reads_it(tmp_path: Path) -> None:
    """values toolChoice.config -> a ConfigMap mounted (as a directory: the kubelet updates it in
    place, and the gateway re-reads it) into the gateway pods and the KubeRay pods, named by
    MOSMEDAI_TOOLS_CONFIG; what it holds is a configuration the platform's own parser accepts."""
    from mosmedai.catalog import tool_config
    from mosmedai.config import Settings

    choice = {"defaults": {"tools": "all"},
              "regions": {"RU-MOW": {"versions": {"cxr_opacity": 2}}, "RU-TA": {"tools": ["cxr_opacity", "cxr_nodule"]}},
              "tenants": {"kazan-rkb": {"versions": {"cxr_opacity": 1}}}}
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"tenants": {"items": [tenant()]}, "toolChoice": {"config": choice, "pollSeconds": 5}}))
    for extra in ([], ["--set", "ray.kuberay.enabled=true"]):
        docs = load_all(helm("template", "mosmedai", str(CHART), "-n", NAMESPACE, "-f", str(values), *extra).stdout)
        (configmap,) = component(docs, "ConfigMap", "tools")
        text = configmap["data"]["tools.yaml"]
        assert yaml.safe_load(text) == choice
        seen = 0
        for doc in docs:
            if doc["kind"] not in ("Deployment", "RayService") or doc["metadata"]["labels"]["app.kubernetes.io/component"] != "gateway":
                continue
            for where, spec in pod_specs(doc):
                (container,) = spec["containers"]
                env = {e["name"]: e.get("value") for e in container["env"]}
                mounts = {m["name"]: m for m in container["volumeMounts"]}
                volumes = {v["name"]: v for v in spec["volumes"]}
                assert env["MOSMEDAI_TOOLS_CONFIG"] == mounts["tools"]["mountPath"] + "/tools.yaml", where
                assert env["MOSMEDAI_TOOLS_CONFIG_POLL_S"] == "5"
                assert "subPath" not in mounts["tools"], where  # a subPath mount is never updated in place
                assert volumes["tools"]["configMap"]["name"] == configmap["metadata"]["name"]
                seen += 1
        assert seen == (1 if not extra else 2)
        # no checksum of the choice on the pods: a change must not restart them
        (gateway,) = [d for d in docs if d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
                      and d["kind"] in ("Deployment", "RayService")]
        assert "toolChoice" not in json.dumps(gateway) and "checksum/tools" not in json.dumps(gateway)
    mounted = tmp_path / "tools.yaml"
    mounted.write_text(text)
    settings = Settings(enabled_tools=yaml.safe_load(CHART.joinpath("values.yaml").read_text())["gateway"]["enabledTools"])
    choices = tool_config.parse(str(mounted), settings, {"kazan-rkb": "RU-TA"})
    assert choices.view("RU-TA", "kazan-rkb").versions["cxr_opacity"] == 1
    assert choices.view("RU-MOW").versions["cxr_opacity"] == 2
    # the default renders an empty configuration: every enabled tool at version 1
    docs = load_all(helm("template", "mosmedai", str(CHART), "-n", NAMESPACE).stdout)
    (configmap,) = component(docs, "ConfigMap", "tools")
    assert yaml.safe_load(configmap["data"]["tools.yaml"]) == {}
