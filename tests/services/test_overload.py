"""Overload on the real local platform: 2x the measured capacity for 60 s.

One tenant (RU-TA) sends chest X-rays synchronously at twice what the platform answers at
saturation, with a 3 s deadline (``Prefer: wait=3``); a second tenant (RU-MOW) sends at a low
rate throughout. Admission control must keep the admitted answers within the deadline and
the goodput near the peak, refuse only with 503/429 + Retry-After, and keep the second
tenant's latency near its unloaded latency."""

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from mosmedai.tenants import DEMO_TOKENS, auth_headers
from mosmedai.training.phantoms import dicom_bytes, make_phantom

DEADLINE_S = 3.0
OVERLOAD_S = 60.0
LOW_RATE = 2.0  # the second tenant's studies per second
HEADERS = {"Content-Type": "application/dicom", "Prefer": f"wait={DEADLINE_S:g}"}


async def _one(client: httpx.AsyncClient, body: bytes, token: str, records: list) -> None:
    started = time.perf_counter()
    try:
        answer = await client.post("/v1/studies", content=body, headers={**HEADERS, **auth_headers(token)})
        records.append((started, time.perf_counter() - started, answer.status_code,
                        answer.headers.get("retry-after"), answer.json().get("error") if answer.status_code != 200 else None))
    except httpx.HTTPError as error:
        records.append((started, time.perf_counter() - started, 0, None, repr(error)))


async def _closed_loop(url: str, bodies: list[bytes], token: str, concurrency: int, seconds: float) -> list:
    records: list = []
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                await _one(client, bodies[i % len(bodies)], token, records)
                i += concurrency
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return records


async def _open_loop(url: str, bodies: list[bytes], token: str, rate: float, seconds: float) -> list:
    """Arrivals at a fixed rate, whatever the answers do (a bounded count, bounded time)."""
    records: list = []
    tasks = []
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=httpx.Limits(max_connections=512)) as client:
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_one(client, bodies[i % len(bodies)], token, records)))
        await asyncio.gather(*tasks)
    return records


def _in_thread(coroutine) -> tuple[threading.Thread, list]:
    box: list = []
    thread = threading.Thread(target=lambda: box.append(asyncio.run(coroutine)))
    thread.start()
    return thread, box


def _p99(records: list) -> float:
    return float(np.percentile([seconds for _, seconds, *_ in records], 99))


@pytest.mark.timeout(900)
def test_twice_the_capacity_is_shed_at_once_and_the_admitted_stay_within_the_deadline(platform):
    url = platform["gateway"]
    heavy, light = DEMO_TOKENS["demo-tatarstan"], DEMO_TOKENS["demo-moscow"]
    bodies = [dicom_bytes(make_phantom((77, i), shape=(600, 500))) for i in range(8)]

    unloaded = asyncio.run(_open_loop(url, bodies, light, LOW_RATE, 10.0))
    assert {code for _, _, code, *_ in unloaded} == {200}
    saturation = asyncio.run(_closed_loop(url, bodies, heavy, 16, 10.0))
    peak = sum(1 for record in saturation if record[2] == 200) / 10.0
    assert peak > 0

    light_thread, light_box = _in_thread(_open_loop(url, bodies, light, LOW_RATE, OVERLOAD_S))
    heavy_records = asyncio.run(_open_loop(url, bodies, heavy, 2 * peak, OVERLOAD_S))
    light_thread.join()
    light_records = light_box[0]

    admitted = [r for r in heavy_records if r[2] == 200]
    refused = [r for r in heavy_records if r[2] != 200]
    goodput = len(admitted) / OVERLOAD_S
    summary = (f"peak {peak:.1f}/s; offered {2 * peak:.1f}/s for {OVERLOAD_S:g} s: goodput {goodput:.1f}/s "
               f"({goodput / peak:.2f} of peak), admitted p99 {_p99(admitted):.2f} s, "
               f"{len(refused)} refused (p99 answer {_p99(refused) * 1000 if refused else 0:.0f} ms); "
               f"second tenant p99 {_p99(light_records) * 1000:.0f} ms vs {_p99(unloaded) * 1000:.0f} ms unloaded")
    print(summary)
    # Every refusal says when to come back; no other error.
    for _, _, code, retry_after, error in refused:
        assert code in (429, 503) and retry_after and retry_after.isdigit(), (code, retry_after, error)
    assert refused, summary  # 2x the capacity cannot all be admitted
    assert _p99(admitted) <= DEADLINE_S, summary
    assert goodput >= 0.9 * peak, summary
    assert {code for _, _, code, *_ in light_records} == {200}, summary
    assert _p99(light_records) <= 2 * _p99(unloaded), summary
