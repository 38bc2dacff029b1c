"""The queueing core: one pool of replicas serving studies first come, first served, in batches.

Model (what Triton's dynamic batcher does per pool, coarsened to the study):

- studies arrive at given times; each needs ``service[modality, b]`` seconds of a replica
  when ``b`` studies share a batch (the profile's per-item time at batch ``b`` times the items
  the study's tools read, summed over its tools);
- a replica that becomes free takes the oldest waiting study and every other study already
  waiting, up to ``max_batch``; a study reaching an idle replica starts at once (no batch wait);
- the number of replicas follows a plan (replicas per tick, repeating with a period): a
  replica removed by a scale-down finishes its batch first, one added is usable from its tick;
- a batch's time is multiplied by a lognormal factor of mean 1 and the profile's
  ``service_cv`` (``dist=1``: exponential factor, for the closed-form M/M/c check).

The loop is compiled with numba when it is installed (about 30-60 ns per study); without
numba the same code runs as plain Python (about 100x slower: fine for tests, not a quarter).
"""
from __future__ import annotations

import math

import numpy as np

try:  # pragma: no cover - which branch depends on the environment
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

    def njit(*args, **kwargs):
        def wrap(function):
            return function
        return wrap


@njit(cache=True)
def _replicas_at(t, plan_t, plan_r, period):
    x = t % period if period > 0 else t
    i = np.searchsorted(plan_t, x, side="right") - 1
    if i < 0:
        i = 0
    r = plan_r[i]
    return r if r > 0 else 1


@njit(cache=True)
def _tick_start(t, plan_t, period):
    if period > 0:
        base = t - (t % period)
        x = t % period
    else:
        base = 0.0
        x = t
    i = np.searchsorted(plan_t, x, side="right") - 1
    if i < 0:
        i = 0
    return base + plan_t[i]


@njit(cache=True)
def _simulate(arrival, modality, service, max_batch, plan_t, plan_r, period, cv, dist, seed, finish, batch_count):
    np.random.seed(seed)
    n = arrival.shape[0]
    servers = 1
    for r in plan_r:
        if r > servers:
            servers = r
    free = np.zeros(servers)
    busy = 0.0
    sigma = math.sqrt(math.log(1.0 + cv * cv)) if cv > 0 else 0.0
    mu = -0.5 * sigma * sigma
    j = 0
    while j < n:
        a = arrival[j]
        r = _replicas_at(a, plan_t, plan_r, period)
        k = 0
        for s in range(1, r):
            if free[s] < free[k]:
                k = s
        start = free[k] if free[k] > a else a
        if start > a:
            r2 = _replicas_at(start, plan_t, plan_r, period)
            if r2 > r:  # replicas were added while the study waited: a new one takes it at its tick
                tick = _tick_start(start, plan_t, period)
                k = r
                for s in range(r + 1, r2):
                    if free[s] < free[k]:
                        k = s
                start2 = tick if tick > a else a
                if free[k] > start2:
                    start2 = free[k]
                if start2 < start:
                    start = start2
        b = 1
        while j + b < n and b < max_batch and arrival[j + b] <= start:
            b += 1
        duration = 0.0
        for i in range(j, j + b):
            duration += service[modality[i], b]
        if dist == 1:
            duration *= np.random.exponential(1.0)
        elif sigma > 0:
            duration *= math.exp(mu + sigma * np.random.standard_normal())
        end = start + duration
        free[k] = end
        busy += duration
        for i in range(j, j + b):
            finish[i] = end
        batch_count[b] += 1
        j += b
    return busy


def simulate(arrival: np.ndarray, modality: np.ndarray, service: np.ndarray, *, replicas: int | None = None,
             plan_t: np.ndarray | None = None, plan_r: np.ndarray | None = None, period_s: float = 0.0,
             cv: float = 0.0, exponential: bool = False, seed: int = 0) -> tuple[np.ndarray, float, np.ndarray]:
    """Finish time of every study, total busy replica-seconds, and batches by size.

    ``service``: seconds, shape (modalities, max_batch + 1); column b is the time one study of
    that modality takes in a batch of b (column 0 unused). Either a fixed ``replicas`` or a plan:
    ``plan_t`` (tick start times, s, increasing, from 0) and ``plan_r`` (replicas from that tick),
    repeating every ``period_s`` (0: no repeat).
    """
    arrival = np.ascontiguousarray(arrival, np.float64)
    modality = np.ascontiguousarray(modality, np.int64)
    if len(arrival) and np.any(np.diff(arrival) < 0):
        raise ValueError("arrivals must be sorted")
    if plan_t is None:
        if replicas is None or replicas < 1:
            raise ValueError("give replicas >= 1 or a plan")
        plan_t, plan_r = np.zeros(1), np.array([replicas], np.int64)
    plan_t = np.ascontiguousarray(plan_t, np.float64)
    plan_r = np.ascontiguousarray(plan_r, np.int64)
    service = np.ascontiguousarray(service, np.float64)
    max_batch = service.shape[1] - 1
    finish = np.empty_like(arrival)
    batch_count = np.zeros(max_batch + 1, np.int64)
    busy = _simulate(arrival, modality, service, max_batch, plan_t, plan_r, float(period_s), float(cv),
                     1 if exponential else 0, int(seed) % (2**32), finish, batch_count)
    return finish, float(busy), batch_count


def erlang_c(c: int, arrival_rate: float, service_rate: float) -> float:
    """Probability that a study waits in an M/M/c queue (Erlang's C formula)."""
    a = arrival_rate / service_rate
    rho = a / c
    if rho >= 1:
        return 1.0
    term, total = 1.0, 1.0
    for k in range(1, c):
        term *= a / k
        total += term
    last = term * a / c / (1 - rho)
    return last / (total + last)


def mmc_wait_quantile(c: int, arrival_rate: float, service_rate: float, q: float) -> float:
    """q-quantile of the waiting time in M/M/c: P(W > t) = C exp(-(c mu - lambda) t)."""
    pw = erlang_c(c, arrival_rate, service_rate)
    if 1 - q >= pw:
        return 0.0
    return math.log(pw / (1 - q)) / (c * service_rate - arrival_rate)
