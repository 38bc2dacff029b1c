"""National serving on the real local platform: two pools (RU-MOW, RU-TA), each its own
Triton process. Home routing by tenant region, the pools endpoint, failover when a pool's
Triton is SIGKILLed under synchronous and asynchronous load, and its return home."""

import concurrent.futures
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from mosmedai.local import processes as local
from mosmedai.config import Settings
from mosmedai.serving.pools import PoolConfigError, local_directory, parse_pools
from mosmedai.jobs.storage import ObjectStore
from mosmedai.ingress.tenants import DEMO_TOKENS, auth_headers
from mosmedai.phantoms.chest_xray import dicom_bytes, make_phantom

TEST_SEED = 4242
DICOM = {"Content-Type": "application/dicom"}
MOSCOW = auth_headers(DEMO_TOKENS["demo-moscow"])
TATARSTAN = auth_headers(DEMO_TOKENS["demo-tatarstan"])
CXR = ("cxr_opacity", "cxr_nodule", "cxr_pneumothorax")


@pytest.fixture(scope="module")
def gateway(platform):
    with httpx.Client(base_url=platform["gateway"], timeout=120.0) as client:
        yield client


def chest(index: int) -> bytes:
    return dicom_bytes(make_phantom((TEST_SEED, index), shape=(600, 500)))


def routes(answer: httpx.Response) -> dict[str, tuple[str, str]]:
    return {tool["tool"]: (tool["pool"], tool["route"]) for tool in answer.json()["tools"]}


# --- the directory (no platform) -------------------------------------------------------------
def test_home_pool_is_the_first_in_the_regions_order_that_loads_the_tool():
    directory = local_directory(Settings())
    assert directory.home("RU-TA", "cxr_nodule") == "RU-TA"
    assert directory.candidates("RU-TA", "cxr_nodule") == ("RU-TA", "RU-MOW")
    assert directory.home("RU-TA", "mg_mass") == "RU-MOW"  # RU-TA does not load it
    assert directory.candidates("RU-TA", "mg_mass") == ("RU-MOW",)
    # A region without a pool of its own: its federal district's pool (RU-MOW serves them all locally).
    assert directory.home("RU-SPE", "cxr_nodule") == "RU-MOW"


@pytest.mark.parametrize("pools, field", [
    ([{"name": "A", "regions": ["RU-MOW"], "endpoints": ["h:1"], "neighbours": ["B"]}], "pools[0].neighbours"),
    ([{"name": "A", "regions": ["RU-MOW"], "endpoints": ["h:1"], "tools": ["no_such_tool"]}], "pools[0].tools"),
    ([{"name": "A", "regions": ["RU-MOX"], "endpoints": ["h:1"]}], "pools[0].regions"),
    ([{"name": "A", "districts": ["XXX"], "endpoints": ["h:1"]}], "pools[0].districts"),
    ([{"name": "A", "regions": ["RU-MOW"], "endpoints": ["not an endpoint"]}], "pools[0].endpoints"),
    ([{"name": "A", "regions": ["RU-MOW"], "endpoints": ["h:1"], "tools": ["cxr_nodule"]}], "pools[].tools"),
])
def test_a_wrong_directory_is_refused_naming_the_field(pools, field):
    import json

    with pytest.raises(PoolConfigError) as error:
        parse_pools(json.dumps(pools), Settings().enabled_tools)
    assert str(error.value).startswith(field), error.value


def test_a_tenant_region_without_any_pool_is_refused():
    directory = parse_pools('[{"name": "A", "regions": ["RU-MOW"], "endpoints": ["h:1"]}]', Settings().enabled_tools)
    with pytest.raises(PoolConfigError, match=r"RU-TA \(tenant kazan\)"):
        directory.check_regions({"moscow": "RU-MOW", "kazan": "RU-TA"})


# --- the platform ----------------------------------------------------------------------------
def test_each_tenant_runs_on_its_regions_home_pool(gateway):
    for headers, pool in ((MOSCOW, "RU-MOW"), (TATARSTAN, "RU-TA")):
        answer = gateway.post("/v1/studies", content=chest(1), headers={**DICOM, **headers})
        assert answer.status_code == 200, answer.text
        assert routes(answer) == {tool: (pool, "home") for tool in CXR}


def _texts(dataset) -> list[str]:
    """Every Text Value and Device Observer Physical Location in an SR content tree."""
    texts = [str(dataset.TextValue)] if "TextValue" in dataset else []
    for item in dataset.get("ContentSequence", []):
        texts += _texts(item)
    return texts


def test_pool_and_route_reach_grpc_and_the_sr(gateway, platform):
    import io

    import grpc
    import pydicom

    from mosmedai.ingress.grpc_api import studies_pb2, studies_pb2_grpc

    with grpc.insecure_channel(platform["grpc"]) as channel:
        answer = studies_pb2_grpc.StudiesStub(channel).Submit(
            studies_pb2.SubmitRequest(instances=[chest(2)]),
            metadata=[("authorization", TATARSTAN["Authorization"])])
    assert {(t.tool, t.pool, t.route) for t in answer.results[0].tools} == {(tool, "RU-TA", "home") for tool in CXR}

    accepted = gateway.post("/v1/studies", content=chest(3), headers={**DICOM, **TATARSTAN, "Prefer": "respond-async"})
    uid = accepted.headers["location"].rsplit("/", 1)[1]
    deadline = time.monotonic() + 120
    while gateway.get(f"/v1/studies/{uid}", headers=TATARSTAN).json()["status"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    sr = pydicom.dcmread(io.BytesIO(gateway.get(f"/v1/studies/{uid}/sr", headers=TATARSTAN).content))
    texts = _texts(sr)
    # TID 4019 algorithm parameters per tool, and the device observer's physical location (TID 1004)
    assert texts.count("pool=RU-TA") >= len(CXR) and "route=home" in texts, texts
    assert "pool RU-TA (home)" in texts, texts


def test_pools_endpoint_shows_every_pool_to_any_tenant_and_no_tenant_data(gateway, platform):
    assert gateway.get("/v1/pools").status_code == 401
    answer = gateway.get("/v1/pools", headers=TATARSTAN)
    assert answer.status_code == 200, answer.text
    pools = {pool["name"]: pool for pool in answer.json()["pools"]}
    assert set(pools) == {"RU-MOW", "RU-TA"}
    ta = pools["RU-TA"]
    assert set(ta) == {"name", "regions", "districts", "endpoint", "state", "tools", "neighbours", "in_flight",
                       "expected_wait_s"}
    assert ta["regions"] == ["RU-TA"] and ta["neighbours"] == ["RU-MOW"] and ta["state"] == "up"
    assert ta["endpoint"] == platform["triton_grpc_RU-TA"] and sorted(ta["tools"]) == sorted(CXR)
    assert "demo" not in answer.text


def test_status_lists_each_local_pools_triton(platform, platform_settings):
    status = local.status(platform_settings)
    assert status["triton"] and status["triton-RU-TA"] and status["triton"] != status["triton-RU-TA"]


def test_each_pools_triton_runs_urgent_steps_first(platform, platform_settings):
    """Triton's rate limiter is on, and the loaded models carry their class's priority."""
    from mosmedai.serving.model_repo import RATE_LIMIT_PRIORITY
    from mosmedai.serving.routing import SCREENING, URGENT

    with httpx.Client(base_url=platform["triton_http"], timeout=10.0) as triton:
        loaded = {model["name"] for model in triton.post("/v2/repository/index", json={"ready": True}).json()}
        expected = {"ctb_hemorrhage_net": RATE_LIMIT_PRIORITY[URGENT], "flg_triage_net": RATE_LIMIT_PRIORITY[SCREENING]}
        assert expected.keys() <= loaded, loaded
        for model, priority in expected.items():
            (group,) = triton.get(f"/v2/models/{model}/config").json()["instance_group"]
            assert group["rate_limiter"]["priority"] == priority, (model, group)
    for group in ("triton", "triton-RU-TA"):  # tritonserver prints its options as it starts
        assert "EXEC_COUNT" in (platform_settings.log_dir / f"{group}.log").read_text(errors="replace"), group


def assert_done_exactly_once(gateway: httpx.Client, store: ObjectStore, settings, tenant: str, headers: dict,
                             uids: list[str], within_s: float = 240.0) -> None:
    """Each accepted study (StudyInstanceUID) of the tenant is done, with one result commit."""
    deadline = time.monotonic() + within_s
    for uid in uids:
        while True:
            status = gateway.get(f"/v1/studies/{uid}", headers=headers).json()
            if status["status"] in ("done", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status["status"] == "done", status
        commits = [key for key in store.list(settings.results_bucket, f"results/{tenant}/{status['job_id']}/")
                   if key.endswith("/result.json")]
        assert len(commits) == 1, (uid, commits)


def _kill_group(settings, group: str) -> set[str]:
    """SIGKILL a group; the Python backend's shared-memory regions its processes mapped."""
    pid = local.running_pid(settings, group)
    assert pid is not None, f"{group} is not running"
    members = local._session_members(pid)
    regions = set()
    for member in members:
        with open(f"/proc/{member}/maps") as maps:
            regions.update(line.split()[-1] for line in maps if "triton_python_backend_shm_region_" in line)
    local._signal_all(members, signal.SIGKILL)
    return regions


def test_a_killed_pool_fails_over_loses_nothing_and_its_region_returns_home(platform, platform_settings, gateway):
    """SIGKILL RU-TA's Triton while RU-TA's tenant sends synchronous and asynchronous studies."""
    store = ObjectStore.local(platform_settings.s3_endpoint)
    answers: list[tuple[float, int, dict, dict]] = []
    stop = threading.Event()

    def synchronous_load(worker: int) -> None:
        with httpx.Client(base_url=platform["gateway"], timeout=60.0) as client:
            index = 0
            while not stop.is_set():
                index += 1
                answer = client.post("/v1/studies", content=chest(1000 * worker + index), headers={**DICOM, **TATARSTAN})
                answers.append((time.monotonic(), answer.status_code, dict(answer.headers),
                                routes(answer) if answer.status_code == 200 else {}))

    accepted = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(synchronous_load, worker) for worker in (1, 2)]
        for i in range(6):  # asynchronous studies accepted before and after the kill
            if i == 3:
                time.sleep(1.0)
                killed_at = time.monotonic()
                left_behind = _kill_group(platform_settings, "triton-RU-TA")
            answer = gateway.post("/v1/studies", content=chest(5000 + i),
                                  headers={**DICOM, **TATARSTAN, "Prefer": "respond-async"})
            assert answer.status_code == 202, answer.text
            accepted.append(answer.headers["location"].rsplit("/", 1)[1])
        time.sleep(6.0)
        stop.set()
        for load in loads:
            load.result()
    after = [a for a in answers if a[0] > killed_at]
    assert after, "no synchronous study was sent after the kill"
    # Every synchronous answer is a result (from the neighbour once RU-TA is gone) or a 503
    # with Retry-After; no other 5xx.
    for _, code, headers, _ in answers:
        assert code == 200 or (code == 503 and headers.get("retry-after", "").isdigit()), (code, headers)
    late = [r for t, code, _, r in after if code == 200 and t > killed_at + 3.0]
    assert late and all(r == {tool: ("RU-MOW", "failover") for tool in CXR} for r in late), late[-3:]
    pools = {p["name"]: p["state"] for p in gateway.get("/v1/pools", headers=TATARSTAN).json()["pools"]}
    assert pools["RU-TA"] in ("ejected", "not_ready")

    # Every accepted study completes, exactly once.
    assert_done_exactly_once(gateway, store, platform_settings, "demo-tatarstan", TATARSTAN, accepted)

    # RU-TA comes back: its region's traffic returns home within RETURN_HOME_S of Triton being ready.
    assert left_behind and all(os.path.exists(region) for region in left_behind)  # SIGKILL unlinks nothing
    local.start_tritons(platform_settings, ["triton-RU-TA"])
    ready_at = time.monotonic()
    assert not any(os.path.exists(region) for region in left_behind), "the killed Triton's shared memory is still there"
    while True:
        answer = gateway.post("/v1/studies", content=chest(9000), headers={**DICOM, **TATARSTAN})
        assert answer.status_code == 200, answer.text
        if routes(answer) == {tool: ("RU-TA", "home") for tool in CXR}:
            break
        assert time.monotonic() - ready_at < RETURN_HOME_S, routes(answer)
        time.sleep(0.5)
    print(f"RU-TA's traffic returned home {time.monotonic() - ready_at:.1f} s after its Triton was ready")


#: Probe interval (1 s) plus the first ejection (5 s), with room for a loaded machine.
RETURN_HOME_S = 15.0


def test_every_local_process_runs_with_its_memory_and_cpu_settings(platform, platform_settings):
    """glibc's default arenas keep each thread's high-water mark (the PSS target, make bench)."""
    groups = {group: pid for group, pid in local.status(platform_settings).items() if pid}
    assert {"triton", "triton-RU-TA", "serve", "dimse", "s3"} <= set(groups)
    for group, leader in groups.items():
        checked = set()
        for member in local._session_members(leader):
            try:
                environ = open(f"/proc/{member}/environ", "rb").read().split(b"\0")
                # Inference yields the CPU to the gateway and router: Triton and its stubs at TRITON_NICE.
                expected = local.TRITON_NICE if group.startswith("triton") else 0
                assert os.getpriority(os.PRIO_PROCESS, member) == expected, (group, member)
            except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
                continue
            if not environ[0]:
                # A process that wrote a longer title over its environment's memory (Ray's
                # workers, setproctitle) shows NULs where it began; it inherited what its leader has.
                continue
            assert b"MALLOC_ARENA_MAX=" + local.MALLOC_ARENAS.encode() in environ, (group, member)
            if group in local.MMAP_THRESHOLD_GROUPS:
                assert b"MALLOC_MMAP_THRESHOLD_=" + local.MMAP_THRESHOLD_GROUPS[group].encode() in environ, group
            checked.add(member)
        assert leader in checked, (group, leader)  # each group's leader shows its settings
        autogroup = Path(f"/proc/{leader}/autogroup")
        if autogroup.exists():  # the session's scheduling group too, where the kernel has them
            assert autogroup.read_text().split()[-1] == str(local.TRITON_NICE if group.startswith("triton") else 0)
