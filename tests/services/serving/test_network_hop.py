"""A pool across a real network hop: a Triton in a network namespace of its own, reached over a
veth pair (iproute2), with a netem delay where the kernel has sch_netem.

The router (its real code, in this process) routes a RU-TA study to that pool and a RU-MOW
study to a pool on loopback; the difference of their round trips is the transfer cost of
one chest X-ray as it travels (the transport-reduced image), the figure the capacity planner
assumes for moving a study to another pool (``--spill-delay-s``)."""

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import time

import httpx
import pytest

from mosmedai.local import processes as local
from mosmedai.config import Settings
from mosmedai.pipeline.work import prepare
from mosmedai.serving.router import Router, StudyContext
from mosmedai.phantoms.chest_xray import dicom_bytes, make_phantom
from mosmedai_load.config import SpillOver

PORT_OFFSET = int(os.environ.get("MOSMEDAI_TEST_PORT_OFFSET", "0"))
NAMESPACE = f"mosmedai-hop{PORT_OFFSET}"
HOST_SIDE, POOL_SIDE = f"mhop{PORT_OFFSET}a", f"mhop{PORT_OFFSET}b"
# A /30 of our own, inside the namespace this test makes (no host outside this machine).
SUBNET = 200 + PORT_OFFSET // 1000 % 50
HOST_ADDRESS, POOL_ADDRESS = f"10.231.{SUBNET}.1", f"10.231.{SUBNET}.2"
NETEM_DELAY_MS = 10.0  # one way, each direction: a 20 ms round trip, about Moscow to Kazan
CALLS = 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="network namespaces need root and iproute2 (CI runs as root)")


def ip(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    command = prefix + (["ip", *args] if args[0] != "tc" else list(args))
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture(scope="module")
def hop():
    """The namespace and veth pair; whether netem delays it."""
    ip("link", "del", HOST_SIDE, check=False)
    ip("netns", "del", NAMESPACE, check=False)
    ip("netns", "add", NAMESPACE)
    try:
        ip("link", "add", HOST_SIDE, "type", "veth", "peer", "name", POOL_SIDE)
        ip("link", "set", POOL_SIDE, "netns", NAMESPACE)
        ip("addr", "add", f"{HOST_ADDRESS}/30", "dev", HOST_SIDE)
        ip("link", "set", HOST_SIDE, "up")
        ip("addr", "add", f"{POOL_ADDRESS}/30", "dev", POOL_SIDE, namespace=NAMESPACE)
        ip("link", "set", POOL_SIDE, "up", namespace=NAMESPACE)
        ip("link", "set", "lo", "up", namespace=NAMESPACE)
        delay = f"{NETEM_DELAY_MS:g}ms"
        first = ip("tc", "qdisc", "add", "dev", HOST_SIDE, "root", "netem", "delay", delay, check=False)
        netem = first.returncode == 0
        if netem:
            ip("tc", "qdisc", "add", "dev", POOL_SIDE, "root", "netem", "delay", delay, namespace=NAMESPACE)
        else:
            print(f"netem unavailable ({first.stderr.strip()}): the hop is a plain veth pair")
        yield netem
    finally:
        ip("link", "del", HOST_SIDE, check=False)
        ip("netns", "del", NAMESPACE, check=False)


@pytest.fixture(scope="module")
def remote_pool(hop, tmp_path_factory):
    """A Triton loading cxr_opacity inside the namespace: its gRPC host:port."""
    base = 28100 + PORT_OFFSET
    settings = Settings(run_dir=tmp_path_factory.mktemp("hop"), bind_host=POOL_ADDRESS, enabled_tools=["cxr_opacity"],
                        second_pool_tools=[], triton_http_port=base, triton_grpc_port=base + 1,
                        triton_metrics_port=base + 2)
    command, env = local.triton_command(settings)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    log = open(settings.log_dir / "triton-hop.log", "ab")
    process = subprocess.Popen(["ip", "netns", "exec", NAMESPACE, *command], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://{POOL_ADDRESS}:{base}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (settings.log_dir / "triton-hop.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Triton across the hop did not become ready"
            time.sleep(0.5)
        yield f"{POOL_ADDRESS}:{base + 1}"
    finally:
        os.killpg(process.pid, 9)
        process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_router_reaches_a_pool_across_a_network_hop_and_measures_the_transfer(hop, remote_pool, platform):
    pools = [
        {"name": "RU-TA", "regions": ["RU-TA"], "endpoints": [remote_pool], "neighbours": ["RU-MOW"]},
        {"name": "RU-MOW", "regions": ["RU-MOW"], "endpoints": [platform["triton_grpc_RU-TA"]]},
    ]
    settings = Settings(enabled_tools=["cxr_opacity"], second_pool_tools=[], pools_file=json.dumps(pools),
                        router_metrics_port=free_port())
    body = dicom_bytes(make_phantom((31, 1), shape=(2500, 2048)))
    _, items, _ = prepare([body], settings, ["cxr_opacity"])
    image = items[0].tensors

    async def run() -> dict[str, list]:
        router = Router.func_or_class(settings.model_dump(mode="json"))
        timings: dict[str, list] = {"RU-TA": [], "RU-MOW": []}
        for _ in range(CALLS + 2):
            for region in timings:
                started = time.perf_counter()
                answer = (await router.infer_image(["cxr_opacity"], image, StudyContext("t", region, 30.0)))["cxr_opacity"]
                timings[region].append((time.perf_counter() - started, answer))
        return timings

    timings = asyncio.run(run())
    remote = [answer for _, answer in timings["RU-TA"]]
    near = [answer for _, answer in timings["RU-MOW"]]
    assert all(a["pool"] == "RU-TA" and a["route"] == "home" for a in remote), remote[0]
    assert all(a["pool"] == "RU-MOW" for a in near)
    assert abs(remote[0]["probability"] - near[0]["probability"]) < 1e-5  # the same network either side
    hop_s = statistics.median(s for s, _ in timings["RU-TA"][2:])
    loop_s = statistics.median(s for s, _ in timings["RU-MOW"][2:])
    transfer_s = max(0.0, hop_s - loop_s)
    print(f"network hop ({'netem ' + format(NETEM_DELAY_MS, 'g') + ' ms each way' if hop else 'veth, no netem'}): "
          f"median call {hop_s * 1000:.1f} ms across the hop vs {loop_s * 1000:.1f} ms on loopback: "
          f"transfer {transfer_s * 1000:.1f} ms for a {image.pixels.nbytes / 1e6:.2f} MB image")
    if hop:
        assert transfer_s >= 2 * NETEM_DELAY_MS / 1000 * 0.8
    # The planner's default transfer is this figure (with the netem link), rounded up.
    assert transfer_s <= SpillOver.delay_s
