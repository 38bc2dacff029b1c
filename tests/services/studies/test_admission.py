"""The gateway's admission gate (mosmedai.studies.admission): waiting in turn, refusals by deadline and share."""

import asyncio

import pytest

from mosmedai.studies.admission import AdmissionGate
from mosmedai.serving.throughput import Throughput


def measured_gate(completed: int = 20, latency_s: float = 0.01) -> AdmissionGate:
    """A gate that has answered ``completed`` studies of ``latency_s`` within about a second:
    throughput 20/s, limit max(4, 20 x 2 x 0.01) = 4."""
    gate = AdmissionGate(min_limit=4)
    for _ in range(completed):
        gate.finished.done()
        gate.latencies.append(latency_s)
    return gate


def test_throughput_follows_new_traffic_within_a_second_of_idle():
    meter = Throughput(window_s=10.0)
    assert meter.rate() == 0.0
    meter.done(30)
    assert meter.rate() == 30.0  # not 3/s averaged over an idle window


@pytest.mark.asyncio
async def test_past_the_limit_studies_wait_and_go_in_turn_per_tenant():
    gate = measured_gate()
    assert gate.limit() == 4
    for tenant in ("kazan", "kazan", "moscow", "moscow"):  # each at its share: 4 // 2
        assert await gate.admit(tenant, 10.0, urgent=False) is None
    kazan = [asyncio.ensure_future(gate.admit("kazan", 10.0, urgent=False)) for _ in range(3)]
    await asyncio.sleep(0)
    moscow = asyncio.ensure_future(gate.admit("moscow", 10.0, urgent=False))
    await asyncio.sleep(0)
    assert gate.in_flight == 4 and gate.queued() == 4
    gate.leave("kazan", 0.0, answered=True)  # one slot: kazan's first waiting study
    gate.leave("kazan", 0.0, answered=True)  # the next slot: moscow's, before kazan's backlog
    await asyncio.sleep(0.05)
    assert kazan[0].done() and moscow.done() and not kazan[1].done()
    assert moscow.result() is None
    for future in kazan[1:]:
        future.cancel()


@pytest.mark.asyncio
async def test_a_quiet_tenant_goes_in_at_once_past_a_busy_tenants_backlog():
    gate = measured_gate()
    for _ in range(4):
        await gate.admit("kazan", 10.0, urgent=False)
    waiting = [asyncio.ensure_future(gate.admit("kazan", 10.0, urgent=False)) for _ in range(5)]
    await asyncio.sleep(0)
    assert gate.queued() == 5
    # moscow holds nothing: below its share (4 // 2), it does not wait behind kazan's five
    assert await gate.admit("moscow", 10.0, urgent=False) is None
    assert await gate.admit("moscow", 10.0, urgent=False) is None
    assert gate.in_flight == 6 and gate.tenant_in_flight == {"kazan": 4, "moscow": 2}
    third = asyncio.ensure_future(gate.admit("moscow", 10.0, urgent=False))  # at its share: it waits
    await asyncio.sleep(0)
    assert not third.done() and gate.queued() == 6
    for future in [*waiting, third]:
        future.cancel()


@pytest.mark.asyncio
async def test_refused_at_once_when_the_wait_in_turn_would_pass_the_deadline():
    gate = measured_gate()  # 20 studies/s, base latency 10 ms
    for tenant in ("kazan", "kazan", "moscow", "moscow"):
        await gate.admit(tenant, 10.0, urgent=False)
    waiting = [asyncio.ensure_future(gate.admit("kazan", 2.0, urgent=False)) for _ in range(19)]
    await asyncio.sleep(0)
    assert gate.queued() == 19  # within half of (2 s - 20 ms) at 20/s: they wait
    # a tenant alone: the 20th would start past half of it: 503 overloaded, with Retry-After
    reason, status, detail, retry_after = await gate.admit("kazan", 2.0, urgent=False)
    assert (reason, status) == ("overloaded", 503) and "deadline" in detail and retry_after >= 1
    # another tenant (at its share) waits for its turn; the busy one now gets 429
    moscow = asyncio.ensure_future(gate.admit("moscow", 2.0, urgent=False))
    await asyncio.sleep(0)
    assert not moscow.done() and gate.queued() == 20
    reason, status, detail, _ = await gate.admit("kazan", 2.0, urgent=False)
    assert (reason, status) == ("fair_share", 429) and "kazan" in detail
    for future in [*waiting, moscow]:
        future.cancel()


@pytest.mark.asyncio
async def test_urgent_studies_never_wait_nor_are_refused():
    gate = measured_gate()
    for _ in range(40):
        await gate.admit("kazan", 100.0, urgent=True)
    assert gate.in_flight == 40
    assert await gate.admit("kazan", 0.001, urgent=True) is None
