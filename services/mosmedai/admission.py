"""Load measurement, and admission at the gateway: the first hop refuses what it cannot serve.

``Throughput`` measures how many items something finishes per second; the router's pools
and the gateway's gate both use it.

``AdmissionGate`` keeps the gateway's synchronous studies in flight near what keeps the
platform busy, an adaptive concurrency limit by Little's law: limit = throughput x twice
the base latency (the 10th percentile of recent latencies). More in flight adds only waiting,
so past the limit a study is refused at once, before any pixel work or routing:

- 429 ``fair_share`` to a tenant that holds at least its share of the limit (the limit split
  evenly among the tenants with studies in flight) while others wait;
- 503 ``overloaded`` otherwise, or when the expected wait exceeds the study's deadline.

A tenant below its share is admitted even past the limit, so a quiet tenant is served
while a busy one is held back. Urgent studies are never refused (routing.URGENT), and the
asynchronous paths never meet the gate. The router then judges the pools
(``mosmedai.router``): a study no pool can finish in time is refused there.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

#: the window (s) over which completions give a rate
WINDOW_S = 10.0


class Throughput:
    """Completions per second over the last WINDOW_S."""

    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def done(self, count: int = 1) -> None:
        self.events.append((time.monotonic(), count))
        self.total += count

    def rate(self) -> float:
        cutoff = time.monotonic() - self.window_s
        while self.events and self.events[0][0] < cutoff:
            self.total -= self.events.popleft()[1]
        return self.total / self.window_s


class AdmissionGate:
    """The gateway's synchronous studies in flight, per tenant, and the decision on a new one."""

    def __init__(self, min_limit: int = 4, latencies: int = 200):
        self.min_limit = min_limit
        self.in_flight = 0
        self.tenants: dict[str, int] = {}
        self.finished = Throughput()
        self.latencies: deque[float] = deque(maxlen=latencies)

    def base_latency_s(self) -> float:
        return float(np.percentile(self.latencies, 10)) if len(self.latencies) >= 10 else 0.0

    def limit(self) -> int:
        base = self.base_latency_s()
        if base <= 0:
            return 1 << 30  # nothing measured yet: no limit
        return max(self.min_limit, math.ceil(self.finished.rate() * 2.0 * base))

    def expected_wait_s(self) -> float:
        rate = self.finished.rate()
        return self.in_flight / rate if rate > 0 else 0.0

    def refuse(self, tenant: str, deadline_s: float, urgent: bool) -> tuple[str, int, str, float] | None:
        """(reason, status, detail, retry after s) to refuse a new study, or None to admit it."""
        if urgent:
            return None
        limit = self.limit()
        wait = self.expected_wait_s()
        retry_after = max(1.0, wait)
        if wait > deadline_s:
            return ("overloaded", 503, f"the platform cannot answer within the deadline ({deadline_s:g} s; "
                    f"expected wait {wait:.1f} s)", retry_after)
        if self.in_flight < limit:
            return None
        others = {name for name, held in self.tenants.items() if held > 0 and name != tenant}
        share = limit / (len(others) + 1)
        held = self.tenants.get(tenant, 0)
        if held < share:
            return None
        if others:
            return ("fair_share", 429, f"tenant {tenant} has {held} studies in flight, its fair share is "
                    f"{share:.0f} while {len(others)} other tenants wait", retry_after)
        return ("overloaded", 503, f"the platform is at its limit ({limit} studies in flight)", retry_after)

    def enter(self, tenant: str) -> float:
        self.in_flight += 1
        self.tenants[tenant] = self.tenants.get(tenant, 0) + 1
        return time.monotonic()

    def leave(self, tenant: str, entered: float, answered: bool) -> None:
        self.in_flight -= 1
        held = self.tenants.get(tenant, 1) - 1
        if held > 0:
            self.tenants[tenant] = held
        else:
            self.tenants.pop(tenant, None)
        if answered:
            self.finished.done()
            self.latencies.append(time.monotonic() - entered)
