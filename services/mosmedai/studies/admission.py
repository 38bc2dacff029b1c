"""Load measurement, and admission at the gateway: the first hop refuses what it cannot serve.

``AdmissionGate`` keeps the gateway's synchronous studies in flight at its concurrency limit
- throughput x ``HEADROOM`` (2) x the base latency (the shortest of the recent latencies), Little's law:
what keeps the platform busy; more in flight adds only waiting, and starves the gateway's own
event loop that must answer refusals at once. A study past the limit waits in the gate
(costing nothing: a single image's body is not even read yet), and the gate lets waiting
studies in one per tenant in turn. A tenant below its share of the limit (the limit over
the tenants active) goes in at once: a quiet tenant does not wait behind a busy one at all.
A study whose wait in turn - (its place in its tenant's queue) x (tenants waiting) /
throughput - would pass half of what its deadline leaves once it runs (``WAIT_SHARE``:
the estimate moves, and a refusal after waiting wastes the wait) is refused at once, before any
pixel work or routing: 429 ``fair_share`` when other tenants are waiting too (its own
backlog is what holds it back), else 503 ``overloaded``. Urgent studies never wait and are
never refused (routing.URGENT); the asynchronous paths never meet the gate.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque

import numpy as np

from mosmedai.serving.throughput import Throughput

#: the share of a study's time left (deadline - time to run) that it may be expected to wait.
#: The expected wait comes from a rate that moves; a study let wait that is refused when its
#: time runs out has cost its client the whole wait, so the gate waits for half and refuses
#: the rest at once (at twice the capacity the waiting room stays full either way).
WAIT_SHARE = 0.5
#: studies in flight per study the platform finishes in the base latency: enough to fill the
#: batches (a full batch forms behind the one in Triton); more only adds waiting in Triton,
#: and the CPU a quiet tenant's study then waits for.
HEADROOM = 2.0
#: how much of the highest recent throughput the capacity estimate keeps after a second
CAPACITY_FADE = 0.99
#: how long (s) the gate keeps its estimate of a study's run time before it recomputes it
RUN_S_REFRESH_S = 0.1


class AdmissionGate:
    """The gateway's synchronous studies in flight and waiting, per tenant (one event loop)."""

    def __init__(self, min_limit: int = 4, latencies: int = 200):
        self.min_limit = min_limit
        self.in_flight = 0
        self.tenant_in_flight: dict[str, int] = {}
        self.waiting: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()  # per tenant, in turn
        self.finished = Throughput()
        self.latencies: deque[float] = deque(maxlen=latencies)
        self._capacity, self._capacity_at = 0.0, time.monotonic()
        self._run_s, self._run_s_at = 0.0, -math.inf

    def base_latency_s(self) -> float:
        """The shortest recent latency: what one study takes with little ahead of it. (A
        percentile would rise with the load the limit lets in, and the limit with it.)"""
        return min(self.latencies) if len(self.latencies) >= 10 else 0.0

    def run_s(self) -> float:
        """What a study let in takes to be answered: the 90th percentile of recent ones, at
        least twice the base latency. Recomputed at most every RUN_S_REFRESH_S: every refused
        or waiting study asks, and the percentile of 200 latencies was 6 % of the gateway's
        Python time at twice the capacity."""
        if len(self.latencies) < 10:
            return 0.0
        now = time.monotonic()
        if now - self._run_s_at > RUN_S_REFRESH_S:
            self._run_s = max(2.0 * self.base_latency_s(), float(np.percentile(self.latencies, 90)))
            self._run_s_at = now
        return self._run_s

    def limit(self) -> int:
        base = self.base_latency_s()
        if base <= 0:
            return 1 << 30  # nothing measured yet: no limit
        return max(self.min_limit, math.ceil(self.capacity() * HEADROOM * base))

    def capacity(self) -> float:
        """Studies per second the platform has shown it can finish: the highest recent rate,
        fading by CAPACITY_FADE a second. (The current rate alone would follow the limit down:
        fewer let in, fewer finished, a lower limit.)"""
        now, rate = time.monotonic(), self.finished.rate()
        faded = self._capacity * CAPACITY_FADE ** (now - self._capacity_at)
        self._capacity, self._capacity_at = max(rate, faded), now
        return self._capacity

    def queued(self) -> int:
        return sum(len(futures) for futures in self.waiting.values())

    def _below_share(self, tenant: str) -> bool:
        """Whether a tenant with nothing waiting holds less than its share of the limit (the
        limit over the tenants in flight or waiting, itself included)."""
        if tenant in self.waiting:
            return False
        active = len((self.tenant_in_flight.keys() | self.waiting.keys()) | {tenant})
        return self.tenant_in_flight.get(tenant, 0) < max(1, self.limit() // active)

    def _enter(self, tenant: str) -> None:
        self.in_flight += 1
        self.tenant_in_flight[tenant] = self.tenant_in_flight.get(tenant, 0) + 1

    async def admit(self, tenant: str, deadline_s: float, urgent: bool) -> tuple[str, int, str, float] | None:
        """None once the study may go on (then ``leave`` when it is answered), or the refusal:
        (reason, HTTP status, detail, retry after s). A tenant below its share of the limit
        goes in at once, past a busy tenant's backlog (the limit is then exceeded by at most
        the quiet tenants' shares)."""
        if urgent or (self.in_flight < self.limit() and not self.waiting) or self._below_share(tenant):
            self._enter(tenant)
            return None
        rate = self.finished.rate() or 1.0
        mine = len(self.waiting.get(tenant, ())) + 1
        others = len(self.waiting.keys() - {tenant})
        # Let in one per tenant in turn: this study starts after ``mine`` turns of every waiting tenant.
        wait = mine * (others + 1) / rate
        budget = deadline_s - self.run_s()  # what is left for waiting once it runs
        if wait > WAIT_SHARE * budget:
            if others:
                return ("fair_share", 429, f"tenant {tenant} has {mine - 1} studies waiting; served in turn with "
                        f"{others} other tenants, the next would start in {wait:.1f} s, past its deadline "
                        f"({deadline_s:g} s)", max(1.0, mine / rate))
            return ("overloaded", 503, f"the platform cannot answer within the deadline ({deadline_s:g} s; "
                    f"expected wait {wait:.1f} s)", max(1.0, wait - WAIT_SHARE * budget))
        future = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(tenant, deque()).append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, budget))
            return None  # the slot was handed over by leave()
        except asyncio.TimeoutError:
            if future.done():  # handed over just as the wait ended: keep it
                return None
            self._forget(tenant, future)
            return ("overloaded", 503, f"no capacity within the deadline ({deadline_s:g} s)", 1.0)
        except asyncio.CancelledError:  # the client went away while waiting
            if future.done():
                self.leave(tenant, time.monotonic(), answered=False)
            else:
                self._forget(tenant, future)
            raise

    def _forget(self, tenant: str, future: asyncio.Future) -> None:
        futures = self.waiting.get(tenant)
        if futures is not None:
            futures.remove(future)
            if not futures:
                del self.waiting[tenant]

    def leave(self, tenant: str, entered: float, answered: bool) -> None:
        """A study that was let in is answered: its slot goes to the next tenant in turn."""
        self.in_flight -= 1
        left = self.tenant_in_flight.get(tenant, 0) - 1
        if left > 0:
            self.tenant_in_flight[tenant] = left
        else:
            self.tenant_in_flight.pop(tenant, None)
        if answered:
            self.finished.done()
            self.latencies.append(time.monotonic() - entered)
        while self.waiting and self.in_flight < self.limit():
            name, futures = next(iter(self.waiting.items()))
            future = futures.popleft()
            if futures:
                self.waiting.move_to_end(name)
            else:
                del self.waiting[name]
            self._enter(name)
            future.set_result(None)
