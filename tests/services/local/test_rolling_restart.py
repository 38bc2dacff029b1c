"""Graceful drain: a rolling restart of the real local platform under steady synchronous and
asynchronous load - the gateway, then the router, then each Triton pool - loses no accepted
study, completes each exactly once, and answers every synchronous study with a result or a
503 with Retry-After.

How each piece is restarted, and why:

- Gateway and router: a rolling update of that Serve deployment (`local.rollout`), what a
  KubeRay upgrade of the Serve config does: a new replica starts, then the old one is
  stopped and drains. Traffic enters through Serve's proxy, as in KubeRay mode. (In plain
  mode a pod is replaced whole: the Service, preStop and SIGTERM do there what the proxy and
  the controller do here; one gateway port on one machine cannot have two pods behind it.)
- Triton: SIGTERM to the pool's tritonserver, as the kubelet sends it; it refuses new work,
  finishes what is in flight (--exit-timeout-secs) and exits; then it is started again
  and the router takes it back when its readiness probe passes.
"""

import asyncio
import threading
import time

import httpx

from mosmedai.local import processes as local
from mosmedai.local.bench_national import Answer, chest_bodies, send
from mosmedai.local.http_load import HttpLoadClient
from mosmedai.jobs.storage import ObjectStore
from mosmedai.ingress.tenants import DEMO_TOKENS, auth_headers
from mosmedai.phantoms.chest_xray import dicom_bytes, make_phantom
from tests.services.serving.test_national import assert_done_exactly_once

TATARSTAN = auth_headers(DEMO_TOKENS["demo-tatarstan"])
#: Seconds for the router to take a restarted pool back (probe 1 s, ejection up to 10 s).
TAKEN_BACK_S = 30.0


class Load:
    """Steady load in a thread of its own: synchronous studies from two tenants (each region's
    home pool is the other's failover) and an asynchronous one about every second."""

    def __init__(self, url: str, async_bodies: list[bytes]):
        self.url, self.async_bodies = url, async_bodies
        self.sync: list[Answer] = []
        self.submitted: list[tuple[float, int, str | None, str | None]] = []  # (t, status, retry-after, uid)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        self.thread.join(120)

    async def _run(self) -> None:
        bodies = chest_bodies(seed=91)
        async with httpx.AsyncClient(base_url=self.url, timeout=120.0) as client, \
                HttpLoadClient(self.url) as load_client:
            async def synchronous(token: str, k: int) -> None:
                while not self.stop.is_set():
                    k += 1
                    try:
                        await send(load_client, bodies[k % len(bodies)], token, None, self.sync)
                    except Exception as error:  # an answer that is not JSON
                        self.sync.append(Answer(time.perf_counter(), 0.0, -1, None, repr(error)))
                        await asyncio.sleep(0.1)  # what fails at once must not spin

            async def asynchronous() -> None:
                for body in self.async_bodies:
                    if self.stop.is_set():
                        return
                    headers = {"Content-Type": "application/dicom", "Prefer": "respond-async", **TATARSTAN}
                    try:
                        answer = await client.post("/v1/studies", content=body, headers=headers)
                    except httpx.HTTPError as error:
                        self.submitted.append((time.monotonic(), 0, None, repr(error)))
                    else:
                        uid = answer.headers["location"].rsplit("/", 1)[1] if answer.status_code == 202 else None
                        self.submitted.append((time.monotonic(), answer.status_code,
                                               answer.headers.get("retry-after"), uid))
                    await asyncio.sleep(1.0)

            await asyncio.gather(synchronous(DEMO_TOKENS["demo-tatarstan"], 0),
                                 synchronous(DEMO_TOKENS["demo-moscow"], 4), asynchronous())


def watch_readiness(url: str, stop: threading.Event, seen: list) -> None:
    """Poll a gateway replica's /readyz (its own port) until it stops answering."""
    with httpx.Client(base_url=url, timeout=5.0) as client:
        while not stop.is_set():
            try:
                answer = client.get("/readyz")
                seen.append((answer.status_code, answer.json().get("error"), answer.headers.get("retry-after")))
            except httpx.HTTPError:
                seen.append((0, "unreachable", None))
            time.sleep(0.05)


def pools(gateway: httpx.Client) -> dict[str, str]:
    return {p["name"]: p["state"] for p in gateway.get("/v1/pools", headers=TATARSTAN).json()["pools"]}


def restart_triton(settings, gateway: httpx.Client, group: str, pool: str) -> float:
    """SIGTERM the pool's Triton, let it drain and exit, start it again; seconds until the
    router has it back in rotation."""
    pid = local.running_pid(settings, group)
    assert pid is not None, f"{group} is not running"
    assert local._stop(settings, group, grace_s=30.0)
    local.start_tritons(settings, [group])
    ready = time.monotonic()
    while pools(gateway)[pool] != "up":
        assert time.monotonic() - ready < TAKEN_BACK_S, pools(gateway)
        time.sleep(0.5)
    return time.monotonic() - ready


def test_rolling_restart_under_load_loses_nothing(platform, platform_settings):
    settings = platform_settings
    proxy = f"http://{settings.bind_host}:{settings.serve_proxy_port}"
    store = ObjectStore.local(settings.s3_endpoint)
    async_bodies = [dicom_bytes(make_phantom((7700, i), shape=(300, 250))) for i in range(90)]
    readiness: list = []
    timings: dict[str, float] = {}
    try:
        with httpx.Client(base_url=proxy, timeout=120.0) as gateway, Load(proxy, async_bodies) as load:
            time.sleep(3.0)
            # The gateway: its old replica (on the gateway port) drains while the new one serves.
            watching = threading.Event()
            watcher = threading.Thread(target=watch_readiness, args=(platform["gateway"], watching, readiness))
            watcher.start()
            started = time.monotonic()
            try:
                local.rollout(settings, "gateway")
            finally:
                watching.set()
                watcher.join()
            timings["gateway"] = time.monotonic() - started
            started = time.monotonic()
            local.rollout(settings, "router")
            timings["router"] = time.monotonic() - started
            for group, pool in (("triton", "RU-MOW"), ("triton-RU-TA", "RU-TA")):
                started = time.monotonic()
                back = restart_triton(settings, gateway, group, pool)
                timings[pool] = time.monotonic() - started
                timings[f"{pool} taken back"] = back
            time.sleep(2.0)
        print("restart timings (s):", {name: round(seconds, 1) for name, seconds in timings.items()})

        # Readiness went false (503 draining) while the old gateway replica drained.
        assert (503, "draining", "1") in readiness, sorted(set(readiness))
        assert all(code in (200, 503, 0) for code, _, _ in readiness), sorted(set(readiness))

        # Every synchronous answer is a result or a 503 with a numeric Retry-After; nothing else,
        # no broken connection.
        codes = sorted({(a.status, a.error) for a in load.sync if a.status != 200})
        print(f"synchronous: {len(load.sync)} answers, {sum(a.status == 200 for a in load.sync)} results; "
              f"others: {codes}")
        for answer in load.sync:
            assert answer.status == 200 or (answer.status == 503 and (answer.retry_after or "").isdigit()), answer
        last = max(a.sent for a in load.sync)
        assert any(a.status == 200 and a.sent > last - 2.0 for a in load.sync), "no result after the restarts"

        # Every asynchronous submission was accepted or refused with Retry-After; every
        # accepted study completes, exactly once.
        for _, status, retry_after, _ in load.submitted:
            assert status == 202 or (status == 503 and (retry_after or "").isdigit()), load.submitted
        accepted = [uid for _, status, _, uid in load.submitted if status == 202]
        assert len(accepted) >= 20, load.submitted
        with httpx.Client(base_url=proxy, timeout=60.0) as gateway:
            assert_done_exactly_once(gateway, store, settings, "demo-tatarstan", TATARSTAN, accepted, within_s=180.0)
    finally:
        restore(settings)


def restore(settings) -> None:
    """Leave the platform as the other tests expect it: every pool's Triton up, and the
    gateway on its own port (restarting the serve group - itself a graceful drain)."""
    local.start_tritons(settings)
    local._stop(settings, "serve", grace_s=max(30.0, settings.gateway_shutdown_s + 10.0))
    local.up(settings)

