"""`make bench`'s national rows: failover between the two local pools, and overload.

- National row: RU-TA's tenant sends chest X-rays at a fixed concurrency; RU-TA's Triton is
  SIGKILLed mid-run. Throughput before and after, time until answers flow again (reroute),
  added p99, and the time RU-TA's traffic takes to return home once its Triton is back.
- Overload row: the peak (closed loop, concurrency 16), then twice that rate as open-loop
  arrivals with a deadline (``Prefer: wait``): goodput, admitted p99, p99 time to a refusal.

The load generators are shared with the tests (tests/services/studies/test_overload.py); they send
with ``mosmedai.local.http_load``, whose cost per request is small enough to offer twice the
capacity from the platform's own cores.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import multiprocessing
import signal
import time
from dataclasses import dataclass

import httpx
import numpy as np

from mosmedai.local import processes as local
from mosmedai.config import Settings
from mosmedai.local.http_load import HttpLoadClient
from mosmedai.ingress.tenants import DEMO_TOKENS, auth_headers
from mosmedai.phantoms.chest_xray import dicom_bytes, make_phantom


@dataclass
class Answer:
    sent: float  # perf_counter at send
    seconds: float
    status: int  # 0: no HTTP answer
    retry_after: str | None
    error: str | None
    pools: tuple[tuple[str, str], ...] = ()  # (pool, route) per tool of a 200


def chest_bodies(count: int = 8, seed: int = 77) -> list[bytes]:
    # small (300 x 250, 150 KB): the load generator, on the same cores, must offer twice the capacity
    return [dicom_bytes(make_phantom((seed, i), shape=(300, 250))) for i in range(count)]


async def send(client: HttpLoadClient, body: bytes, token: str, deadline_s: float | None, into: list) -> None:
    headers = {"Content-Type": "application/dicom", **auth_headers(token)}
    if deadline_s:
        headers["Prefer"] = f"wait={deadline_s:g}"
    started = time.perf_counter()
    try:
        answer = await client.post("/v1/studies", body, headers)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as error:
        into.append(Answer(started, time.perf_counter() - started, 0, None, repr(error)))
        return
    seconds = time.perf_counter() - started
    data = answer.json()
    pools = tuple((tool["pool"], tool["route"]) for tool in data["tools"]) if answer.status == 200 else ()
    into.append(Answer(started, seconds, answer.status, answer.headers.get("retry-after"),
                       None if answer.status == 200 else data.get("error"), pools))


async def closed_loop(url: str, bodies: list[bytes], token: str, concurrency: int, seconds: float,
                      deadline_s: float | None = None, into: list | None = None) -> list[Answer]:
    answers: list[Answer] = [] if into is None else into
    stop = time.perf_counter() + seconds
    async with HttpLoadClient(url) as client:
        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                await send(client, bodies[i % len(bodies)], token, deadline_s, answers)
                i += concurrency
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return answers


async def open_loop(url: str, bodies: list[bytes], token: str, rate: float, seconds: float,
                    deadline_s: float | None = None) -> list[Answer]:
    """Arrivals at a fixed rate whatever the answers do: a bounded count in bounded time."""
    answers: list[Answer] = []
    async with HttpLoadClient(url) as client:
        start = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(client, bodies[i % len(bodies)], token, deadline_s, answers)))
        await asyncio.gather(*tasks)
    return answers


def _open_loop_here(*args) -> list[Answer]:
    gc.freeze()  # what the parent had allocated is not this generator's to collect
    return asyncio.run(open_loop(*args))


def open_loops_apart(*loads: tuple) -> list[list[Answer]]:
    """Each load (``open_loop``'s arguments) sent from a process of its own, all at once. A
    generator sharing a GIL with another, or a large heap's garbage collection (the bench's),
    adds its own waiting to the latencies it measures."""
    with concurrent.futures.ProcessPoolExecutor(len(loads), mp_context=multiprocessing.get_context("fork")) as pool:
        running = [pool.submit(_open_loop_here, *load) for load in loads]
        return [load.result() for load in running]


def p99(answers: list[Answer]) -> float:
    return float(np.percentile([a.seconds for a in answers], 99)) if answers else float("nan")


def ok(answers: list[Answer]) -> list[Answer]:
    return [a for a in answers if a.status == 200]


def in_time(answers: list[Answer], within_s: float) -> list[Answer]:
    """Results that came back within ``within_s`` of the first send: goodput counts no late ones."""
    if not answers:
        return []
    end = min(answer.sent for answer in answers) + within_s
    return [answer for answer in ok(answers) if answer.sent + answer.seconds <= end]


def overload_row(settings: Settings, deadline_s: float = 3.0, seconds: float = 30.0) -> dict:
    url = f"http://{settings.bind_host}:{settings.gateway_http_port}"
    bodies = chest_bodies()
    token = DEMO_TOKENS["demo-tatarstan"]
    saturation = asyncio.run(closed_loop(url, bodies, token, 16, 10.0))
    peak = len(ok(saturation)) / 10.0
    answers, = open_loops_apart((url, bodies, token, 2 * peak, seconds, deadline_s))
    refused = [a for a in answers if a.status != 200]
    goodput = len(in_time(answers, seconds + deadline_s)) / seconds
    return {"peak_img_s": peak, "offered_img_s": 2 * peak, "goodput_img_s": goodput,
            "goodput_of_peak": goodput / peak if peak else 0.0,
            "admitted_p99_s": p99(ok(answers)), "refused": len(refused),
            "refusal_p99_ms": p99(refused) * 1000.0,
            "refusal_codes": sorted({a.status for a in refused}), "deadline_s": deadline_s}


def national_row(settings: Settings, seconds: float = 10.0, concurrency: int = 8) -> dict:
    """RU-TA's Triton killed mid-run, then restarted."""
    url = f"http://{settings.bind_host}:{settings.gateway_http_port}"
    bodies = chest_bodies(seed=78)
    token = DEMO_TOKENS["demo-tatarstan"]
    answers: list[Answer] = []

    async def run() -> float:
        load = asyncio.ensure_future(closed_loop(url, bodies, token, concurrency, 2 * seconds, into=answers))
        await asyncio.sleep(seconds)
        killed = time.perf_counter()
        pid = local.running_pid(settings, "triton-RU-TA")
        local._signal_all(local._session_members(pid), signal.SIGKILL)
        await load
        return killed

    killed = asyncio.run(run())
    before = [a for a in answers if a.sent + a.seconds < killed]
    after = [a for a in answers if a.sent > killed]
    failed_over = [a for a in ok(after) if all(route == "failover" for _, route in a.pools)]
    reroute_s = min((a.sent + a.seconds for a in failed_over), default=float("nan")) - killed
    span_after = seconds - max(0.0, reroute_s)
    local.start_tritons(settings, ["triton-RU-TA"])
    ready = time.perf_counter()
    home_s = float("nan")
    with httpx.Client(base_url=url, timeout=60.0) as client:
        while time.perf_counter() - ready < 60.0:
            answer = client.post("/v1/studies", content=bodies[0],
                                 headers={"Content-Type": "application/dicom", **auth_headers(token)})
            if answer.status_code == 200 and all(t["pool"] == "RU-TA" for t in answer.json()["tools"]):
                home_s = time.perf_counter() - ready
                break
            time.sleep(0.2)
    return {"before_img_s": len(ok(before)) / seconds, "after_img_s": len(failed_over) / span_after if span_after > 0 else 0.0,
            "reroute_s": reroute_s, "p99_before_s": p99(ok(before)), "p99_after_s": p99(ok(after)),
            "added_p99_ms": (p99(ok(after)) - p99(ok(before))) * 1000.0,
            "errors_after": sorted({a.status for a in after if a.status != 200}), "return_home_s": home_s}


def report(national: dict, overload: dict) -> None:
    print(f"== national: RU-TA's Triton SIGKILLed mid-run (RU-TA tenant, concurrency 8)\n"
          f"   before {national['before_img_s']:.1f} img/s, after (failover to RU-MOW) {national['after_img_s']:.1f} img/s; "
          f"rerouted in {national['reroute_s']:.2f} s; p99 {national['p99_before_s'] * 1000:.0f} -> "
          f"{national['p99_after_s'] * 1000:.0f} ms (+{national['added_p99_ms']:.0f} ms); "
          f"non-200 after the kill: {national['errors_after'] or 'none'}; "
          f"home again {national['return_home_s']:.1f} s after RU-TA was ready")
    print(f"== overload: 2x the peak ({overload['peak_img_s']:.1f} studies/s) for 30 s, deadline "
          f"{overload['deadline_s']:g} s\n   goodput {overload['goodput_img_s']:.1f}/s "
          f"({overload['goodput_of_peak']:.2f} of peak), admitted p99 {overload['admitted_p99_s']:.2f} s, "
          f"{overload['refused']} refused {overload['refusal_codes']}, refusal p99 {overload['refusal_p99_ms']:.0f} ms")
