"""The operator in-process (kopf.testing.KopfRunner) against kmock's Kubernetes API emulator.

Create, update, delete, child drift, status updates and refused specs. The emulator plays
the API server (with generation, uid and the garbage collector); where the test needs
the Deployment controller (readiness), it writes the Deployment's status itself.
"""
from __future__ import annotations

import asyncio
import copy
from typing import Any

import kmock
import prometheus_client
import pytest

from mosmedai_operator.testing import (
    ClusterEmulator,
    gpupool,
    running_operator,
    spawn_operator,
    stop_process,
    wait_for,
    write_kubeconfig,
)

pytestmark = pytest.mark.asyncio

NAMESPACE = "mosmedai"  # the conftest's `namespace` fixture; test modules cannot import the conftest
POOLS = "mosmedai.io/v1alpha1/gpupools"
DEPLOYMENTS, SERVICES, PDBS, MONITORS = "apps/v1/deployments", "v1/services", "policy/v1/poddisruptionbudgets", "monitoring.coreos.com/v1/servicemonitors"
PATHS = {
    POOLS: f"/apis/mosmedai.io/v1alpha1/namespaces/{NAMESPACE}/gpupools",
    DEPLOYMENTS: f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments",
    SERVICES: f"/api/v1/namespaces/{NAMESPACE}/services",
    PDBS: f"/apis/policy/v1/namespaces/{NAMESPACE}/poddisruptionbudgets",
    MONITORS: f"/apis/monitoring.coreos.com/v1/namespaces/{NAMESPACE}/servicemonitors",
}


def read(cluster: ClusterEmulator, resource: str, name: str) -> dict[str, Any] | None:
    try:
        obj = cluster.objects[resource, NAMESPACE, name]
    except KeyError:
        return None
    return None if obj.deleted else copy.deepcopy(dict(obj.last.raw))


def versions(cluster: ClusterEmulator, resource: str, name: str) -> int:
    try:
        return len(cluster.objects[resource, NAMESPACE, name].history)
    except KeyError:
        return 0


async def call(cluster: ClusterEmulator, method: str, path: str, body: Any = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
    async with cluster.request(method, path, json=body, headers=headers) as response:
        assert response.status < 300, await response.text()
        return await response.json()


def condition(pool: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for item in ((pool or {}).get("status") or {}).get("conditions") or []:
        if item["type"] == kind:
            return item
    return {}


def observed(cluster: ClusterEmulator, name: str, generation: int):
    def check() -> dict[str, Any] | None:
        pool = read(cluster, POOLS, name)
        return pool if pool and (pool.get("status") or {}).get("observedGeneration") == generation else None
    return check


async def test_create_makes_owned_children_and_status(cluster: ClusterEmulator, make_config) -> None:
    body = gpupool("ru-mow", NAMESPACE, gpu={"count": 2, "product": "NVIDIA-A100-SXM4-80GB"},
                   nodeSelector={"mosmedai.io/gpu-pool": "inference"},
                   tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   replicas={"min": 2, "max": 6}, serviceMonitor={"enabled": True}, modelLoadTimeoutSeconds=600)
    async with running_operator(make_config(service_monitor_labels={"release": "prometheus"}), NAMESPACE):
        await call(cluster, "POST", PATHS[POOLS], body)
        pool = await wait_for(observed(cluster, "ru-mow", 1), message="status.observedGeneration 1")
    uid = pool["metadata"]["uid"]
    for resource in (DEPLOYMENTS, SERVICES, PDBS, MONITORS):
        child = read(cluster, resource, "ru-mow")
        assert child is not None, resource
        assert child["metadata"]["ownerReferences"] == [{
            "apiVersion": "mosmedai.io/v1alpha1", "kind": "GpuPool", "name": "ru-mow", "uid": uid,
            "controller": True, "blockOwnerDeletion": True}]
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "mosmedai-operator"
        assert child["metadata"]["labels"]["mosmedai.io/region"] == "RU-MOW"

    deployment = read(cluster, DEPLOYMENTS, "ru-mow")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "triton:test"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "--load-model=cxr_opacity" in container["args"] and "--load-model=cxr_nodule" in container["args"]
    assert "--metrics-config=summary_latencies=true" in container["args"]
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] == 600
    assert pod["nodeSelector"] == {"mosmedai.io/gpu-pool": "inference", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "affinity" not in pod
    service = read(cluster, SERVICES, "ru-mow")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert read(cluster, PDBS, "ru-mow")["spec"]["maxUnavailable"] == 1
    assert read(cluster, MONITORS, "ru-mow")["metadata"]["labels"]["release"] == "prometheus"

    status = pool["status"]
    assert (status["desiredReplicas"], status["replicas"], status["readyReplicas"]) == (2, 0, 0)
    assert status["lastScaleReason"].startswith("MinReplicas")
    assert condition(pool, "Ready")["status"] == "False" and condition(pool, "Ready")["reason"] == "ReplicasNotReady"
    assert condition(pool, "Scaling")["reason"] == "ScalingUp"
    assert condition(pool, "Degraded")["status"] == "Unknown"  # no timer tick yet
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])


async def test_update_changes_children_and_observed_generation(cluster: ClusterEmulator, make_config) -> None:
    body = gpupool("ru-spe", NAMESPACE, region="RU-SPE", nodeSelector={"a": "1", "b": "2"},
                   affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                       {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["spb-1"]}]}]}}},
                   replicas={"min": 3, "max": 6})
    async with running_operator(make_config(), NAMESPACE):
        await call(cluster, "POST", PATHS[POOLS], body)
        await wait_for(observed(cluster, "ru-spe", 1), message="first reconcile")
        # Fewer tools, a node-selector key removed, affinity removed, max below the current size.
        await call(cluster, "PATCH", f"{PATHS[POOLS]}/ru-spe", {"spec": {
            "tools": ["cxr_pneumothorax"], "nodeSelector": {"a": "1", "b": None}, "affinity": None,
            "replicas": {"min": 1, "max": 2}}})
        pool = await wait_for(observed(cluster, "ru-spe", 2), message="observedGeneration 2")
    deployment = read(cluster, DEPLOYMENTS, "ru-spe")
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert "--load-model=cxr_pneumothorax" in args and "--load-model=cxr_opacity" not in args
    assert pod["nodeSelector"] == {"a": "1"}
    assert "affinity" not in pod
    assert deployment["spec"]["replicas"] == 2
    assert pool["status"]["desiredReplicas"] == 2
    assert pool["status"]["lastScaleReason"].startswith("MaxReplicas")


async def test_child_drift_and_deletion_are_repaired(cluster: ClusterEmulator, make_config) -> None:
    async with running_operator(make_config(), NAMESPACE):
        await call(cluster, "POST", PATHS[POOLS], gpupool("ru-nvs", NAMESPACE, region="RU-NVS", timeZone="Asia/Novosibirsk",
                                                          replicas={"min": 2, "max": 4}, serviceMonitor={"enabled": True}))
        await wait_for(observed(cluster, "ru-nvs", 1), message="first reconcile")
        desired = read(cluster, DEPLOYMENTS, "ru-nvs")

        # Someone edits the Deployment: another image, a manual scale, an extra node selector, a label.
        await call(cluster, "PATCH", f"{PATHS[DEPLOYMENTS]}/ru-nvs", {
            "metadata": {"labels": {"team": "sre"}},
            "spec": {"replicas": 9, "template": {"spec": {
                "nodeSelector": {"rogue": "yes"},
                "containers": [{**desired["spec"]["template"]["spec"]["containers"][0], "image": "evil:latest"}]}}}})
        repaired = await wait_for(
            lambda: (d := read(cluster, DEPLOYMENTS, "ru-nvs")) and d["spec"]["replicas"] == 2
            and d["spec"]["template"]["spec"]["containers"][0]["image"] == "triton:test"
            and "rogue" not in d["spec"]["template"]["spec"]["nodeSelector"] and d,
            message="Deployment repaired")
        assert repaired["metadata"]["labels"]["team"] == "sre"  # extra labels of others are left alone

        # Someone deletes the Service, the PDB and the ServiceMonitor.
        for resource in (SERVICES, PDBS, MONITORS):
            await call(cluster, "DELETE", f"{PATHS[resource]}/ru-nvs")
        for resource in (SERVICES, PDBS, MONITORS):
            await wait_for(lambda: read(cluster, resource, "ru-nvs"), message=f"{resource} recreated")

        # A selector edit on the Service is reverted too.
        await call(cluster, "PATCH", f"{PATHS[SERVICES]}/ru-nvs", {"spec": {"selector": {"extra": "x"}}})
        await wait_for(lambda: "extra" not in read(cluster, SERVICES, "ru-nvs")["spec"]["selector"], message="selector repaired")

        # No write storm: once repaired, nothing more is written while nothing changes.
        await wait_for(lambda: True)
        counts = {r: versions(cluster, r, "ru-nvs") for r in (DEPLOYMENTS, SERVICES, PDBS, MONITORS)}
        await asyncio.sleep(1.0)
        assert counts == {r: versions(cluster, r, "ru-nvs") for r in (DEPLOYMENTS, SERVICES, PDBS, MONITORS)}
    writes = prometheus_client.REGISTRY.get_sample_value(
        "mosmedai_operator_child_writes_total", {"namespace": NAMESPACE, "pool": "ru-nvs", "kind": "Service", "action": "created"})
    assert writes == 2


async def test_status_follows_deployment_readiness(cluster: ClusterEmulator, make_config) -> None:
    async with running_operator(make_config(), NAMESPACE):
        await call(cluster, "POST", PATHS[POOLS], gpupool("ru-irk", NAMESPACE, region="RU-IRK", timeZone="Asia/Irkutsk",
                                                          replicas={"min": 3, "max": 5}))
        await wait_for(observed(cluster, "ru-irk", 1), message="first reconcile")
        # The Deployment controller's part: two of three pods ready, then all three.
        await call(cluster, "PATCH", f"{PATHS[DEPLOYMENTS]}/ru-irk/status",
                   {"status": {"replicas": 3, "readyReplicas": 2, "availableReplicas": 2}})
        pool = await wait_for(lambda: (p := read(cluster, POOLS, "ru-irk")) and p["status"].get("readyReplicas") == 2 and p,
                              message="readyReplicas 2")
        assert condition(pool, "Ready")["status"] == "False"
        assert condition(pool, "Scaling")["status"] == "True"
        await call(cluster, "PATCH", f"{PATHS[DEPLOYMENTS]}/ru-irk/status",
                   {"status": {"replicas": 3, "readyReplicas": 3, "availableReplicas": 3}})
        pool = await wait_for(lambda: (p := read(cluster, POOLS, "ru-irk")) and p["status"].get("readyReplicas") == 3 and p,
                              message="readyReplicas 3")
    assert condition(pool, "Ready")["status"] == "True" and condition(pool, "Ready")["reason"] == "ReplicasReady"
    assert condition(pool, "Scaling") == {**condition(pool, "Scaling"), "status": "False", "reason": "Stable"}
    assert prometheus_client.REGISTRY.get_sample_value(
        "mosmedai_operator_ready_replicas", {"namespace": NAMESPACE, "pool": "ru-irk", "region": "RU-IRK"}) == 3


INVALID_SPECS = [
    ("min-above-max", {"replicas": {"min": 5, "max": 2}}, "spec.replicas.min (5) is greater than spec.replicas.max (2)"),
    ("unknown-time-zone", {"timeZone": "Europe/Atlantis"}, "spec.timeZone 'Europe/Atlantis' is not an IANA time zone"),
    ("unknown-tool", {"tools": ["cxr_opacity", "ct_brain_bleed"]}, "spec.tools ['ct_brain_bleed'] are not ensembles"),
    ("floor-above-max", {"schedule": [{"start": "08:00", "end": "18:00", "minReplicas": 9}]}, "spec.schedule[0].minReplicas (9)"),
    ("schema-violation", {"replicas": {"min": -1, "max": 2}}, "spec.replicas.min: Input should be greater than or equal to 0"),
]


@pytest.mark.parametrize("spec,message", [c[1:] for c in INVALID_SPECS], ids=[c[0] for c in INVALID_SPECS])
async def test_invalid_spec_is_refused_without_touching_the_cluster(cluster: ClusterEmulator, make_config, spec, message) -> None:
    async with running_operator(make_config(), NAMESPACE):
        await call(cluster, "POST", PATHS[POOLS], gpupool("ru-bad", NAMESPACE, **spec))
        pool = await wait_for(observed(cluster, "ru-bad", 1), message="refusal written")
    for resource in (DEPLOYMENTS, SERVICES, PDBS, MONITORS):
        assert read(cluster, resource, "ru-bad") is None, resource
    ready, degraded = condition(pool, "Ready"), condition(pool, "Degraded")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    assert message in degraded["message"]
    assert "desiredReplicas" not in pool["status"]
    assert prometheus_client.REGISTRY.get_sample_value(
        "mosmedai_operator_pool_spec_valid", {"namespace": NAMESPACE, "pool": "ru-bad", "region": pool["spec"]["region"]}) == 0


async def test_valid_pool_turned_invalid_keeps_its_children_unchanged(cluster: ClusterEmulator, make_config) -> None:
    async with running_operator(make_config(autoscale_interval_seconds=0.3), NAMESPACE):
        await call(cluster, "POST", PATHS[POOLS], gpupool("ru-tat", NAMESPACE, region="RU-TA"))
        await wait_for(observed(cluster, "ru-tat", 1), message="first reconcile")
        before = {r: read(cluster, r, "ru-tat") for r in (DEPLOYMENTS, SERVICES, PDBS)}
        await call(cluster, "PATCH", f"{PATHS[POOLS]}/ru-tat", {"spec": {"tools": ["mammo_mass"], "replicas": {"max": 8}}})
        pool = await wait_for(observed(cluster, "ru-tat", 2), message="refusal of generation 2")
        await asyncio.sleep(1.0)  # a few timer ticks: they must not act on the refused spec either
        assert {r: read(cluster, r, "ru-tat") for r in (DEPLOYMENTS, SERVICES, PDBS)} == before
        assert condition(pool, "Degraded")["reason"] == "InvalidSpec"
        # Fixing the spec resumes reconciling.
        await call(cluster, "PATCH", f"{PATHS[POOLS]}/ru-tat", {"spec": {"tools": ["cxr_nodule"]}})
        pool = await wait_for(observed(cluster, "ru-tat", 3), message="generation 3 accepted")
    assert condition(pool, "Degraded")["reason"] != "InvalidSpec"
    assert "--load-model=cxr_nodule" in read(cluster, DEPLOYMENTS, "ru-tat")["spec"]["template"]["spec"]["containers"][0]["args"]


async def test_foreign_object_with_the_same_name_is_not_taken_over(cluster: ClusterEmulator, make_config) -> None:
    await call(cluster, "POST", PATHS[SERVICES], {"apiVersion": "v1", "kind": "Service",
                                                  "metadata": {"name": "ru-yar", "namespace": NAMESPACE}, "spec": {"ports": []}})
    async with running_operator(make_config(), NAMESPACE):
        await call(cluster, "POST", PATHS[POOLS], gpupool("ru-yar", NAMESPACE, region="RU-YAR"))
        pool = await wait_for(observed(cluster, "ru-yar", 1), message="refusal")
    assert condition(pool, "Ready")["reason"] == "ChildConflict"
    assert read(cluster, DEPLOYMENTS, "ru-yar") is None
    assert "ownerReferences" not in read(cluster, SERVICES, "ru-yar")["metadata"]


async def test_service_monitor_follows_its_switch(cluster: ClusterEmulator, make_config) -> None:
    async with running_operator(make_config(), NAMESPACE):
        await call(cluster, "POST", PATHS[POOLS], gpupool("ru-sam", NAMESPACE, region="RU-SAM", serviceMonitor={"enabled": True}))
        await wait_for(lambda: read(cluster, MONITORS, "ru-sam"), message="ServiceMonitor created")
        await call(cluster, "PATCH", f"{PATHS[POOLS]}/ru-sam", {"spec": {"serviceMonitor": {"enabled": False}}})
        await wait_for(lambda: read(cluster, MONITORS, "ru-sam") is None and observed(cluster, "ru-sam", 2)(),
                       message="ServiceMonitor deleted")


async def test_delete_leaves_children_to_the_garbage_collector(cluster: ClusterEmulator, make_config) -> None:
    async with running_operator(make_config(autoscale_interval_seconds=0.3), NAMESPACE):
        await call(cluster, "POST", PATHS[POOLS], gpupool("ru-kgd", NAMESPACE, region="RU-KGD", timeZone="Europe/Kaliningrad"))
        await wait_for(observed(cluster, "ru-kgd", 1), message="first reconcile")
        await call(cluster, "DELETE", f"{PATHS[POOLS]}/ru-kgd")
        # No finalizer of ours: the pool goes at once, the emulator's garbage collector
        # removes the children through their ownerReferences.
        await wait_for(lambda: all(read(cluster, r, "ru-kgd") is None for r in (POOLS, DEPLOYMENTS, SERVICES, PDBS)),
                       message="pool and children gone")
        await asyncio.sleep(1.0)  # timers and child events must not bring anything back
        assert all(read(cluster, r, "ru-kgd") is None for r in (POOLS, DEPLOYMENTS, SERVICES, PDBS))
    assert prometheus_client.REGISTRY.get_sample_value(
        "mosmedai_operator_desired_replicas", {"namespace": NAMESPACE, "pool": "ru-kgd", "region": "RU-KGD"}) is None


async def test_prometheus_unreachable_holds_and_degrades(cluster: ClusterEmulator, make_config) -> None:
    async with running_operator(make_config(autoscale_interval_seconds=0.2), NAMESPACE):
        await call(cluster, "POST", PATHS[POOLS], gpupool("ru-che", NAMESPACE, region="RU-CHE", timeZone="Asia/Yekaterinburg",
                                                          replicas={"min": 2, "max": 4}))
        pool = await wait_for(lambda: (p := read(cluster, POOLS, "ru-che")) and condition(p, "Degraded").get("reason") == "PrometheusUnavailable" and p,
                              message="Degraded PrometheusUnavailable")
    assert condition(pool, "Degraded")["status"] == "True"
    assert "127.0.0.1:9" in condition(pool, "Degraded")["message"]
    assert pool["status"]["desiredReplicas"] == 2 and read(cluster, DEPLOYMENTS, "ru-che")["spec"]["replicas"] == 2
    assert prometheus_client.REGISTRY.get_sample_value(
        "mosmedai_operator_scaling_decisions_total", {"namespace": NAMESPACE, "pool": "ru-che", "region": "RU-CHE", "reason": "NoMetrics"}) >= 1


async def test_autoscaling_on_real_prometheus(cluster: ClusterEmulator, make_config, prometheus) -> None:
    config = make_config(prometheus_url=prometheus.url, autoscale_interval_seconds=0.3, query_step_seconds=15)
    async with running_operator(config, NAMESPACE):
        # 120 images/s at 20 per replica: 6 replicas, then steady (an absolute signal).
        await call(cluster, "POST", PATHS[POOLS], gpupool("busy", NAMESPACE, targets={"imagesPerSecondPerReplica": 20},
                                                          replicas={"min": 1, "max": 10}))
        # No series at all for this pool: hold and say so.
        await call(cluster, "POST", PATHS[POOLS], gpupool("quiet", NAMESPACE, replicas={"min": 2, "max": 4}))
        labels = {"namespace": NAMESPACE, "pool": "busy", "region": "RU-MOW"}
        steady = lambda: prometheus_client.REGISTRY.get_sample_value(
            "mosmedai_operator_scaling_decisions_total", {**labels, "reason": "WithinTargets"})
        busy = await wait_for(lambda: (p := read(cluster, POOLS, "busy")) and (p.get("status") or {}).get("desiredReplicas") == 6
                              and condition(p, "Degraded").get("reason") == "AsExpected" and steady() and p, message="busy scaled to 6")
        quiet = await wait_for(lambda: (p := read(cluster, POOLS, "quiet")) and condition(p, "Degraded").get("reason") == "NoMetrics" and p,
                               message="quiet degraded")
    assert read(cluster, DEPLOYMENTS, "busy")["spec"]["replicas"] == 6
    assert busy["status"]["lastScaleReason"].startswith("ThroughputAboveTarget")
    assert busy["status"]["imagesPerSecond"] == pytest.approx(120, rel=0.01)
    assert busy["status"].get("queueTimeP95Ms") is None  # not a target: not queried
    assert quiet["status"]["desiredReplicas"] == 2
    assert prometheus_client.REGISTRY.get_sample_value("mosmedai_operator_scaling_decisions_total", {**labels, "reason": "ThroughputAboveTarget"}) == 1
    assert prometheus_client.REGISTRY.get_sample_value("mosmedai_operator_scaling_decisions_total", {**labels, "reason": "WithinTargets"}) >= 1
    assert read(cluster, POOLS, "busy")["status"]["desiredReplicas"] == 6  # steady: an absolute signal does not creep


def writers(cluster: ClusterEmulator) -> set[str]:
    """User agents of the operator's writes (kopf's own requests say kopf/...)."""
    return {r.headers.get("User-Agent", "") for r in cluster
            if r.method in (kmock.method.POST, kmock.method.PATCH, kmock.method.DELETE)
            and r.headers.get("User-Agent", "").startswith("mosmedai-operator/")}


async def test_two_replicas_do_not_both_act(cluster: ClusterEmulator, model_repository, tmp_path) -> None:
    """Two real replicas (processes) with kopf peering: the lower priority pauses while the higher lives."""
    await call(cluster, "POST", f"/apis/kopf.dev/v1/namespaces/{NAMESPACE}/kopfpeerings",
               {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "mosmedai-operator", "namespace": NAMESPACE}})
    kubeconfig = write_kubeconfig(tmp_path / "replica-kubeconfig", str(cluster.url))
    settings = {"NAMESPACES": NAMESPACE, "PROMETHEUS_URL": "http://127.0.0.1:9", "MODEL_REPOSITORY_PATH": str(model_repository),
                "AUTOSCALE_INTERVAL_SECONDS": "0.5", "METRICS_PORT": "", "HEALTH_PORT": "", "RETRY_DELAY_SECONDS": "0.5"}
    peers = lambda: (read(cluster, "kopf.dev/v1/kopfpeerings", "mosmedai-operator") or {}).get("status") or {}
    leader = spawn_operator(kubeconfig, {**settings, "PEERING_PRIORITY": "200"}, log=tmp_path / "leader.log")
    follower = None
    try:
        await wait_for(lambda: len(peers()) == 1, timeout=30, message="leader announced")
        follower = spawn_operator(kubeconfig, {**settings, "PEERING_PRIORITY": "100"}, log=tmp_path / "follower.log")
        await wait_for(lambda: len(peers()) == 2, timeout=30, message="follower announced")
        await call(cluster, "POST", PATHS[POOLS], gpupool("ru-ha", NAMESPACE, region="RU-MOW"))
        await wait_for(observed(cluster, "ru-ha", 1), timeout=20, message="reconciled")
        await asyncio.sleep(1.5)  # timer ticks of whoever is active
        assert len(writers(cluster)) == 1, writers(cluster)
        first = writers(cluster)

        # The leader goes away; a clean exit (SIGTERM) removes it from the peering.
        assert await asyncio.to_thread(stop_process, leader) == 0
        await wait_for(lambda: len(peers()) == 1, timeout=20, message="leader gone from the peering")
        await call(cluster, "DELETE", f"{PATHS[SERVICES]}/ru-ha")
        await wait_for(lambda: read(cluster, SERVICES, "ru-ha"), timeout=20, message="follower repairs the Service")
        assert len(writers(cluster) - first) == 1  # the follower, and only it, took over
    finally:
        await asyncio.to_thread(stop_process, leader)
        if follower is not None:
            await asyncio.to_thread(stop_process, follower)
    # kopf starts a peered replica paused; the follower resumed only when the leader left.
    follower_log = (tmp_path / "follower.log").read_text()
    assert "Resuming operations after the pause" in follower_log
    assert follower_log.index("Resuming operations") < follower_log.index("decision (")
