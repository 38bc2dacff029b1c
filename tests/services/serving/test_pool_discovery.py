"""Pool discovery against kmock's Kubernetes API emulator: the real ``kubernetes`` client lists
and watches GpuPools, and the pools appear, change and disappear as the GpuPools do.

The emulator runs on the test's event loop, so the test's own (blocking) client calls run in
a worker thread; the watcher runs in its own thread, as in the router.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import kmock
from kubernetes import client, config

from mosmedai.serving.pool_discovery import GROUP, GRPC_PORT, METRICS_PORT, PLURAL, VERSION, PoolWatcher, pool_spec
from mosmedai.serving.pools import PoolConfigError
from mosmedai_operator import children
from mosmedai_operator.spec import GpuPoolSpec
from mosmedai_operator.testing import ClusterEmulator, write_kubeconfig

NAMESPACE = "mosmedai"
TOOLS = ["cxr_opacity", "cxr_nodule", "cxr_pneumothorax"]

pytestmark = pytest.mark.kmock(cls=ClusterEmulator)


def gpupool(name: str, region: str, tools: list[str], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GpuPool", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"region": region, "timeZone": "Europe/Moscow", "tools": tools,
                     "targets": {"queueTimeP95Ms": 300}, **spec}}


@pytest_asyncio.fixture
async def cluster(kmock: ClusterEmulator) -> ClusterEmulator:
    kmock.declare_resources()
    return kmock


@pytest.fixture
def kubeconfig(cluster: ClusterEmulator, tmp_path: Path) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", str(cluster.url))


@pytest.fixture
def api(kubeconfig: Path) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(config.new_client_from_config(str(kubeconfig)))


class Recorder:
    """on_change's calls, as the router would receive them (from the watcher's thread)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, int]]] = []

    def __call__(self, directory: Any, ready: dict[str, int]) -> None:
        self.calls.append((directory, ready))


async def eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


async def call(function, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(function, *args, **kwargs)


async def started(watcher: PoolWatcher) -> PoolWatcher:
    watcher.start()
    assert await call(watcher.wait_synced, 10), "the first list never came"
    return watcher


@pytest.mark.asyncio
async def test_pools_appear_change_and_disappear_with_gpupools(cluster: ClusterEmulator, kubeconfig: Path,
                                                               api: client.CustomObjectsApi) -> None:
    recorder = Recorder()
    watcher = await started(PoolWatcher(NAMESPACE, TOOLS, recorder,
                                        api_client=config.new_client_from_config(str(kubeconfig))))
    try:
        # No GpuPool: no directory (a directory needs a pool), and nothing reported.
        assert watcher.directory() is None and watcher.ready() == {} and recorder.calls == []

        # Moscow first: its neighbour ru-ta is no GpuPool yet, so it is left out until it is.
        await call(api.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL,
                   gpupool("ru-mow", "RU-MOW", TOOLS, neighbours=["ru-ta"], districts=["CFD"]))
        await eventually(lambda: _assert_pools(watcher, {"ru-mow"}))
        assert watcher.directory().pools["ru-mow"].neighbours == ()
        await call(api.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL,
                   gpupool("ru-ta", "RU-TA", ["cxr_opacity"], neighbours=["ru-mow"], transferSeconds=0.2))
        await eventually(lambda: _assert_pools(watcher, {"ru-mow", "ru-ta"}))
        directory = watcher.directory()
        mow, ta = directory.pools["ru-mow"], directory.pools["ru-ta"]
        # A district pool serves its own region through its districts, like the district's others.
        assert (mow.regions, mow.districts, mow.tools, mow.neighbours) == ((), ("CFD",), tuple(TOOLS), ("ru-ta",))
        assert mow.endpoints == (f"ru-mow.{NAMESPACE}.svc:8001",)
        assert mow.metrics_url == f"http://ru-mow.{NAMESPACE}.svc:8002/metrics"
        assert (ta.regions, ta.tools, ta.neighbours, ta.transfer_s) == (("RU-TA",), ("cxr_opacity",), ("ru-mow",), 0.2)
        assert directory.home("RU-TA", "cxr_opacity") == "ru-ta"
        assert directory.home("RU-TA", "cxr_nodule") == "ru-mow"  # Tatarstan's pool lacks it: its neighbour
        assert directory.home("RU-TUL", "cxr_nodule") == "ru-mow"  # Tula has no pool: the Central district's
        assert watcher.ready() == {"ru-mow": 0, "ru-ta": 0}  # no status yet: not ready

        # The operator reports ready replicas (status subresource): the readiness follows.
        await call(api.patch_namespaced_custom_object_status, GROUP, VERSION, NAMESPACE, PLURAL, "ru-ta",
                   {"status": {"readyReplicas": 2, "replicas": 2}})
        await eventually(lambda: _assert_equal(watcher.ready(), {"ru-mow": 0, "ru-ta": 2}))

        # An SRE adds a tool to Tatarstan's pool: it becomes the home of that tool for RU-TA.
        await call(api.patch_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, "ru-ta",
                   {"spec": {"tools": ["cxr_opacity", "cxr_nodule"]}})
        await eventually(lambda: _assert_equal(watcher.directory().home("RU-TA", "cxr_nodule"), "ru-ta"))
        assert watcher.directory().pools["ru-ta"].tools == ("cxr_opacity", "cxr_nodule")
        assert watcher.ready() == {"ru-mow": 0, "ru-ta": 2}

        # Deleted: gone from the directory, and from Moscow's neighbours.
        await call(api.delete_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, "ru-ta")
        await eventually(lambda: _assert_pools(watcher, {"ru-mow"}))
        assert watcher.directory().pools["ru-mow"].neighbours == ()
        assert watcher.ready() == {"ru-mow": 0}
        # Tatarstan now has no pool, and Moscow's pool serves the Central district only.
        assert watcher.directory().order("RU-TA") == ()
        # Every change came through the one watch stream: one list, one watch, no polling.
        assert _requests(cluster, "list") == 1 and _requests(cluster, "watch") == 1
    finally:
        await call(watcher.stop)
    assert not watcher._thread.is_alive(), "stop() left the watcher thread running"

    # Each change was reported once, in order, and the last report is what the accessors give.
    pools_seen = [sorted(directory.pools) for directory, _ in recorder.calls]
    assert pools_seen[0] == ["ru-mow"] and ["ru-mow", "ru-ta"] in pools_seen and pools_seen[-1] == ["ru-mow"]
    readies = [ready for _, ready in recorder.calls]
    assert {"ru-mow": 0, "ru-ta": 2} in readies
    for before, after in zip(recorder.calls, recorder.calls[1:]):
        assert (before[0].as_json(), before[1]) != (after[0].as_json(), after[1]), "the same state reported twice"
    assert recorder.calls[-1][1] == {"ru-mow": 0}


def _assert_pools(watcher: PoolWatcher, names: set[str]) -> None:
    directory = watcher.directory()
    assert directory is not None and set(directory.pools) == names, directory and sorted(directory.pools)


def _requests(cluster: ClusterEmulator, action: str) -> int:
    """GpuPool requests of one Kubernetes action (list, watch) the emulator received."""
    # kmock 0.8 keeps its request log in _requests (mosmedai_operator.testing trims it there too).
    return sum(1 for request in cluster._requests
               if request.action == kmock.action(action)
               and request.resource is not None and request.resource.plural == PLURAL)


def _assert_equal(actual: Any, expected: Any) -> None:
    assert actual == expected


@pytest.mark.asyncio
async def test_an_invalid_directory_keeps_the_last_good_one(cluster: ClusterEmulator, kubeconfig: Path,
                                                           api: client.CustomObjectsApi,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    await call(api.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL,
               gpupool("ru-mow", "RU-MOW", TOOLS, districts=["CFD"]))
    watcher = await started(PoolWatcher(NAMESPACE, TOOLS, api_client=config.new_client_from_config(str(kubeconfig))))
    try:
        await eventually(lambda: _assert_pools(watcher, {"ru-mow"}))
        good = watcher.directory()
        # The emulator, unlike an API server, does not apply the CRD's schema: the watcher
        # must refuse what the schema would (an unknown federal district) on its own.
        with caplog.at_level(logging.WARNING, logger="mosmedai.serving.pool_discovery"):
            await call(api.patch_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, "ru-mow",
                       {"spec": {"districts": ["Moscow"]}})
            await eventually(lambda: _assert_equal("gpupools/ru-mow: spec.districts" in caplog.text, True))
        assert watcher.directory() is good
        # Readiness still follows the GpuPool meanwhile.
        await call(api.patch_namespaced_custom_object_status, GROUP, VERSION, NAMESPACE, PLURAL, "ru-mow",
                   {"status": {"readyReplicas": 1}})
        await eventually(lambda: _assert_equal(watcher.ready(), {"ru-mow": 1}))
        # Fixed: the directory follows again.
        await call(api.patch_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, "ru-mow",
                   {"spec": {"districts": ["CFD", "NWF"]}})
        await eventually(lambda: _assert_equal(watcher.directory().pools["ru-mow"].districts, ("CFD", "NWF")))
        # The last pool deleted: no directory can name no pool, so the last one stays, not ready.
        await call(api.delete_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, "ru-mow")
        await eventually(lambda: _assert_equal(watcher.ready(), {"ru-mow": 0}))
        assert set(watcher.directory().pools) == {"ru-mow"}
    finally:
        await call(watcher.stop)


@pytest.mark.asyncio
async def test_the_watch_reconnects_after_it_ends(cluster: ClusterEmulator, kubeconfig: Path,
                                                                     api: client.CustomObjectsApi,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # No api_client: the watcher loads the kubeconfig itself, as a router outside a cluster does.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    # kmock never ends a watch (it ignores timeoutSeconds): the client's read timeout
    # (watch_timeout_s plus 1 s) does, and the loop lists and watches again.
    # No namespace either: the kubeconfig context's (as a pod's own, from its ServiceAccount).
    path = Path(kubeconfig)
    path.write_text(path.read_text().replace("namespace: default", f"namespace: {NAMESPACE}"))
    watcher = await started(PoolWatcher("", TOOLS, watch_timeout_s=0.5, retry_max_s=0.5))
    assert watcher.namespace == NAMESPACE
    try:
        await asyncio.sleep(3.0)
        assert _requests(cluster, "watch") >= 2 and _requests(cluster, "list") >= 2
        await call(api.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL,
                   gpupool("ru-kgd", "RU-KGD", TOOLS))
        await eventually(lambda: _assert_pools(watcher, {"ru-kgd"}))

        await call(api.patch_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, "ru-kgd",
                   {"spec": {"transferSeconds": 0.4}})
        await eventually(lambda: _assert_equal(watcher.directory().pools["ru-kgd"].transfer_s, 0.4))
    finally:
        await call(watcher.stop)
    assert not watcher._thread.is_alive()


@pytest.mark.asyncio
async def test_410_gone_lists_again_and_watches_on(cluster: ClusterEmulator, kubeconfig: Path,
                                                  api: client.CustomObjectsApi) -> None:
    await call(api.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL,
               gpupool("ru-kgd", "RU-KGD", TOOLS))
    watcher = await started(PoolWatcher(NAMESPACE, TOOLS, api_client=config.new_client_from_config(str(kubeconfig))))
    try:
        await eventually(lambda: _assert_pools(watcher, {"ru-kgd"}))
        await eventually(lambda: _assert_equal(_requests(cluster, "watch"), 1))
        assert _requests(cluster, "list") == 1
        # The resourceVersion expired: the server sends a 410 Status in the stream. The
        # watcher lists again at once (so nothing missed is lost) and watches on.
        gone = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                            "metadata": {"namespace": NAMESPACE}, "reason": "Expired",
                                            "message": "too old resource version", "code": 410}}
        await cluster._buses[kmock.resource(GROUP, VERSION, PLURAL)].put(gone)  # the emulator's event bus
        await eventually(lambda: _assert_equal((_requests(cluster, "list"), _requests(cluster, "watch")), (2, 2)),
                         timeout=0.9)  # at once: not after the 1 s an error waits
        await call(api.patch_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, "ru-kgd",
                   {"spec": {"transferSeconds": 1.5}})
        await eventually(lambda: _assert_equal(watcher.directory().pools["ru-kgd"].transfer_s, 1.5))
    finally:
        await call(watcher.stop)


def test_endpoints_are_those_of_the_service_the_operator_makes() -> None:
    raw = gpupool("ru-kam", "RU-KAM", ["cxr_opacity"], neighbours=["ru-kha"])
    spec = GpuPoolSpec.model_validate(raw["spec"])
    service = children.service({**raw, "metadata": {**raw["metadata"], "uid": "u"}}, spec)
    ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}
    assert (GRPC_PORT, METRICS_PORT) == (ports["grpc"], ports["metrics"])
    pool, notes = pool_spec(raw, NAMESPACE, TOOLS, known_pools=["ru-kam", "ru-kha"])
    assert pool.endpoints == (f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{ports['grpc']}",)
    assert pool.metrics_url == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{ports['metrics']}/metrics"
    assert notes == []


def test_what_a_router_cannot_use_is_left_out_and_said() -> None:
    raw = gpupool("ru-kam", "RU-KAM", ["cxr_opacity", "ct_brain_bleed"], neighbours=["ru-kam", "ru-kha", "ru-mow"])
    pool, notes = pool_spec(raw, NAMESPACE, TOOLS, known_pools=["ru-kam", "ru-mow"])
    assert pool.tools == ("cxr_opacity",) and pool.neighbours == ("ru-mow",)
    assert notes == ["gpupools/ru-kam: spec.tools ['ct_brain_bleed'] are not enabled in this router "
                     "(enabled_tools): left out",
                     "gpupools/ru-kam: spec.neighbours names the pool itself: left out",
                     "gpupools/ru-kam: spec.neighbours ['ru-kha'] are not GpuPools in mosmedai: left out"]
    with pytest.raises(PoolConfigError, match=r"gpupools/ru-kam: spec.transferSeconds: .*less than or equal to 600"):
        pool_spec(gpupool("ru-kam", "RU-KAM", ["cxr_opacity"], transferSeconds=601), NAMESPACE, TOOLS)
    with pytest.raises(PoolConfigError, match=r"gpupools/ru-kam: spec.region: .*"):
        pool_spec(gpupool("ru-kam", "Kamchatka", ["cxr_opacity"]), NAMESPACE, TOOLS)


@pytest.mark.asyncio
async def test_the_router_follows_the_gpupools(cluster: ClusterEmulator, kubeconfig: Path,
                                               api: client.CustomObjectsApi, monkeypatch, unused_tcp_port: int) -> None:
    """The router itself in discovery mode: its pools (GET /v1/pools) are the GpuPools."""
    from mosmedai.config import Settings
    from mosmedai.serving.router import Router

    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    settings = Settings(pool_discovery="kubernetes", pool_namespace=NAMESPACE, enabled_tools=TOOLS,
                        second_pool_tools=[], router_metrics_port=unused_tcp_port, pool_probe_interval_s=0.2)
    await call(api.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL,
               gpupool("ru-mow", "RU-MOW", TOOLS, districts=["CFD", "VFD"]))
    # The constructor waits for the first list: off this loop, where the emulator runs.
    router = await call(Router.func_or_class, settings.model_dump(mode="json"))
    try:
        pools = {pool["name"]: pool for pool in await router.pools_info()}
        assert set(pools) == {"ru-mow"} and pools["ru-mow"]["endpoint"] == f"ru-mow.{NAMESPACE}.svc:8001"
        await call(api.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL,
                   gpupool("ru-ta", "RU-TA", ["cxr_opacity"], neighbours=["ru-mow"]))

        async def names() -> set[str]:
            return {pool["name"] for pool in await router.pools_info()}

        deadline = time.monotonic() + 10
        while await names() != {"ru-mow", "ru-ta"}:
            assert time.monotonic() < deadline, await names()
            await asyncio.sleep(0.1)
        assert router.directory.home("RU-TA", "cxr_opacity") == "ru-ta"
        assert router.directory.home("RU-TA", "cxr_nodule") == "ru-mow"  # via the Volga district
        await call(api.delete_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, "ru-ta")
        while await names() != {"ru-mow"}:
            assert time.monotonic() < deadline + 10, await names()
            await asyncio.sleep(0.1)
    finally:
        await call(router.watcher.stop)
