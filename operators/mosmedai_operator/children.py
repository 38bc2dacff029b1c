"""Pure builders of a pool's children and the comparison that finds drift.

Desired manifests are plain dicts. Two conventions make them comparable with what the
API server returns (which adds defaults such as ``protocol: TCP``):

- ``is_subset(desired, actual)``: every key the operator sets must be there with the
  same value; keys the API server (or another controller) added are ignored, except
  inside an ``Owned`` mapping, whose key set must match exactly.
- ``None`` in a desired manifest means "must be absent"; the merge patch
  (RFC 7386) deletes such keys, and the extra keys of ``Owned`` mappings.

Quantities are strings ("1", "8Gi") because that is how the API server returns them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mosmedai_operator import API_VERSION, KIND, MANAGER
from mosmedai_operator.config import OperatorConfig
from mosmedai_operator.spec import GpuPoolSpec

HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002  # Triton's defaults in its image
PROBE_PERIOD_SECONDS = 10
POOL_LABEL = "mosmedai.io/pool"
REGION_LABEL = "mosmedai.io/region"
MANAGED_BY = {"app.kubernetes.io/managed-by": MANAGER}


class Owned(dict):
    """A mapping owned whole by the operator: keys it does not list are removed."""


def selector_labels(pool_name: str) -> dict[str, str]:
    # Immutable in a Deployment: keep it to what never changes for a pool.
    return {"app.kubernetes.io/name": "triton", POOL_LABEL: pool_name}


def common_labels(pool_name: str, region: str) -> dict[str, str]:
    return {
        **selector_labels(pool_name),
        "app.kubernetes.io/instance": pool_name,
        "app.kubernetes.io/component": "inference",
        "app.kubernetes.io/part-of": "mosmedai",
        **MANAGED_BY,
        REGION_LABEL: region,
    }


def owner_reference(pool: Mapping[str, Any]) -> dict[str, Any]:
    meta = pool["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        # The garbage collector deletes children after the pool (background deletion);
        # blocking lets `kubectl delete --cascade=foreground` wait for them.
        "blockOwnerDeletion": True,
    }


def _metadata(pool: Mapping[str, Any], spec: GpuPoolSpec, name: str, extra_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    labels = common_labels(pool["metadata"]["name"], spec.region)
    labels.update(extra_labels or {})
    return {
        "name": name,
        "namespace": pool["metadata"]["namespace"],
        "labels": labels,
        "ownerReferences": [owner_reference(pool)],
    }


def model_repository(spec: GpuPoolSpec, config: OperatorConfig) -> str:
    """The repository the pool's Triton reads: spec.modelRepository (a TensorRT repository is
    per GPU product and TensorRT version; CPU pools read the ONNX one), else the operator's."""
    return spec.model_repository or config.triton_model_repository


def triton_args(spec: GpuPoolSpec, config: OperatorConfig) -> list[str]:
    args = [
        "tritonserver",
        f"--model-repository={model_repository(spec, config)}",
        # Explicit mode loads exactly the pool's ensembles (and the models they compose).
        "--model-control-mode=explicit",
        *(f"--load-model={tool}" for tool in spec.tools),
        f"--http-port={HTTP_PORT}",
        f"--grpc-port={GRPC_PORT}",
        f"--metrics-port={METRICS_PORT}",
        # p95 queue time for the autoscaler: nv_inference_queue_summary_us{quantile="0.95"}.
        "--metrics-config=summary_latencies=true",
        # Not ready until every listed model has loaded; exit if one fails to load.
        "--strict-readiness=true",
        "--exit-on-error=true",
        # After SIGTERM: refuse new work, finish in-flight inferences for this long; the pod's
        # grace period covers it (OperatorConfig refuses a shorter one).
        f"--exit-timeout-secs={config.triton_exit_timeout_seconds}",
        # Urgent tools' steps first when executions wait (the model configs' rate_limiter
        # priorities; the resource name is mosmedai.serving.model_repo.RATE_LIMIT_RESOURCE).
        "--rate-limit=execution_count",
        f"--rate-limit-resource=compute:{config.triton_execution_slots}",
        *config.triton_extra_args,
    ]
    return args


def deployment(pool: Mapping[str, Any], spec: GpuPoolSpec, config: OperatorConfig, replicas: int) -> dict[str, Any]:
    name = pool["metadata"]["name"]
    labels = common_labels(name, spec.region)
    node_selector = Owned(spec.node_selector)
    if spec.gpu.product:
        node_selector[config.gpu_product_label] = spec.gpu.product
    resources: dict[str, Any] = {
        "requests": Owned({"cpu": config.triton_cpu_request, "memory": config.triton_memory_request}),
        "limits": Owned({"memory": config.triton_memory_limit}),
    }
    if spec.gpu.count > 0:
        # Extended resources are set in limits (requests default to them), as a string quantity.
        resources["limits"][spec.gpu.resource_name] = str(spec.gpu.count)
        resources["requests"][spec.gpu.resource_name] = str(spec.gpu.count)
    container: dict[str, Any] = {
        "name": "triton",
        "image": config.triton_image,
        "args": triton_args(spec, config),
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": resources,
        # Keep serving while the endpoint removal propagates (kube-proxy, the gateway's
        # gRPC channel); the kubelet's sleep action needs no binary in the image.
        "lifecycle": {"preStop": {"sleep": {"seconds": config.triton_pre_stop_seconds}}}
        if config.triton_pre_stop_seconds else None,
        # Loading TensorRT plans for several ensembles takes minutes: the startup probe
        # allows spec.modelLoadTimeoutSeconds before liveness starts counting.
        "startupProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": "http"},
            "periodSeconds": PROBE_PERIOD_SECONDS,
            "failureThreshold": math.ceil(spec.model_load_timeout_seconds / PROBE_PERIOD_SECONDS),
        },
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": PROBE_PERIOD_SECONDS,
            "failureThreshold": 6,
        },
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "envFrom": ([{"secretRef": {"name": config.triton_model_repository_secret}}]
                    if config.triton_model_repository_secret else None),
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "nodeSelector": node_selector,
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations],
        "affinity": spec.affinity,  # None removes an affinity that the spec no longer has
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,  # triton-server user of NVIDIA's image
            "runAsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,  # Triton never talks to the API server
        # preStop sleep + Triton's exit timeout, plus a margin before SIGKILL.
        "terminationGracePeriodSeconds": config.triton_termination_grace_period_seconds,
        "volumes": [
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": config.triton_shm_size}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(pool, spec, name),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(name)},
            # Keep serving capacity during a rollout: one extra pod, none taken away early.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def service(pool: Mapping[str, Any], spec: GpuPoolSpec) -> dict[str, Any]:
    name = pool["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(pool, spec, name),
        "spec": {
            "type": "ClusterIP",
            "selector": Owned(selector_labels(name)),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def pod_disruption_budget(pool: Mapping[str, Any], spec: GpuPoolSpec) -> dict[str, Any]:
    name = pool["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(pool, spec, name),
        # One pod at a time during node drains; maxUnavailable (not minAvailable) so that
        # a one-replica pool at night does not block a drain forever.
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(name)}},
    }


def service_monitor(pool: Mapping[str, Any], spec: GpuPoolSpec, config: OperatorConfig) -> dict[str, Any]:
    name = pool["metadata"]["name"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(pool, spec, name, config.service_monitor_labels),
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            "endpoints": [{
                "port": "metrics",
                "path": "/metrics",
                "interval": spec.service_monitor.interval,
                # The labels the autoscaler's default queries select on.
                "relabelings": [
                    {"sourceLabels": ["__meta_kubernetes_service_label_mosmedai_io_pool"], "targetLabel": "gpupool"},
                    {"sourceLabels": ["__meta_kubernetes_service_label_mosmedai_io_region"], "targetLabel": "region"},
                ],
            }],
        },
    }


# (apiVersion, plural) of each child kind, for API paths and watching.
CHILD_RESOURCES: dict[str, tuple[str, str]] = {
    "Deployment": ("apps/v1", "deployments"),
    "Service": ("v1", "services"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitors"),
}


def children(pool: Mapping[str, Any], spec: GpuPoolSpec, config: OperatorConfig, replicas: int) -> list[dict[str, Any]]:
    """Every child the pool should have, in creation order (Deployment last: it is the costly one)."""
    result = [service(pool, spec), pod_disruption_budget(pool, spec)]
    if spec.service_monitor.enabled:
        result.append(service_monitor(pool, spec, config))
    result.append(deployment(pool, spec, config, replicas))
    return result


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == []


def is_subset(desired: Any, actual: Any) -> bool:
    """Does ``actual`` hold everything ``desired`` sets (see the module's docstring)?"""
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            return all(_empty(v) for v in desired.values()) and _empty(actual)
        if isinstance(desired, Owned) and set(actual) - {k for k, v in desired.items() if v is not None}:
            return False
        for key, value in desired.items():
            if value is None or _empty(value):
                if not _empty(actual.get(key)):
                    return False
            elif key not in actual or not is_subset(value, actual[key]):
                return False
        return True
    if isinstance(desired, list):
        if _empty(desired):
            return _empty(actual)
        return isinstance(actual, list) and len(actual) == len(desired) and all(
            is_subset(d, a) for d, a in zip(desired, actual))
    return desired == actual


def merge_patch(desired: Any, actual: Any) -> Any:
    """An RFC 7386 merge patch that makes ``actual`` hold ``desired``.

    It is ``desired`` itself plus ``None`` for the extra keys of ``Owned`` mappings.
    Lists are replaced whole, which is what a merge patch does anyway.
    """
    if isinstance(desired, Mapping):
        patch: dict[str, Any] = {}
        actual_map = actual if isinstance(actual, Mapping) else {}
        for key, value in desired.items():
            patch[key] = merge_patch(value, actual_map.get(key))
        if isinstance(desired, Owned):
            for key in actual_map:
                if key not in desired:
                    patch[key] = None
        return patch
    if isinstance(desired, list):
        return [strip_nones(item) for item in desired]
    return desired


def strip_nones(value: Any) -> Any:
    """The manifest to create: without the "must be absent" markers."""
    if isinstance(value, Mapping):
        return {k: strip_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nones(v) for v in value]
    return value


def object_path(api_version: str, plural: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    """The REST path of an object (or of a collection, when name is None)."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
    return path


def child_path(manifest: Mapping[str, Any], with_name: bool = True) -> str:
    api_version, plural = CHILD_RESOURCES[manifest["kind"]]
    meta = manifest["metadata"]
    return object_path(api_version, plural, meta["namespace"], meta["name"] if with_name else None)


def owned_by(child: Mapping[str, Any], pool_uid: str) -> bool:
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == pool_uid for ref in refs)
