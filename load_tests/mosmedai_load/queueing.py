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


from mosmedai.serving.routing import route  # noqa: E402 - the router's own decision, compiled below

# One policy, one function: the simulation decides spill-over with the router's ``route``.
_route = njit(cache=True)(route)


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


# --- pools coupled by spill-over ------------------------------------------------------------
#
# The same FIFO batching as ``_simulate``, written without look-ahead so that several pools can
# be advanced together in one global time order: a pool keeps one *open* batch (its replica,
# start time and members); a study reaching the pool at or before that start joins it while
# there is room, otherwise the batch is closed (its duration drawn, its members finished) and
# the study opens a new one on the replica free first. With spill-over off this gives exactly
# ``_simulate``'s finish times (with cv 0; the noise draws interleave differently otherwise).


@njit(cache=True)
def _close(p, members, ob_k, ob_start, ob_count, free, modality, service, sigma, mu, dist, finish, busy, batch_count):
    b = ob_count[p]
    if b == 0:
        return
    duration = 0.0
    for m in range(b):
        duration += service[modality[members[p, m]], b]
    if dist == 1:
        duration *= np.random.exponential(1.0)
    elif sigma > 0:
        duration *= math.exp(mu + sigma * np.random.standard_normal())
    end = ob_start[p] + duration
    free[p, ob_k[p]] = end
    busy[p] += duration
    for m in range(b):
        finish[members[p, m]] = end
    batch_count[p, b] += 1
    ob_count[p] = 0


@njit(cache=True)
def _place(p, a, free, plan_t, plan_r, period):
    """(replica, start) a study reaching pool p at time a would get on a new batch."""
    r = _replicas_at(a, plan_t, plan_r[p], period)
    k = 0
    for s in range(1, r):
        if free[p, s] < free[p, k]:
            k = s
    start = free[p, k] if free[p, k] > a else a
    if start > a:
        r2 = _replicas_at(start, plan_t, plan_r[p], period)
        if r2 > r:
            tick = _tick_start(start, plan_t, period)
            k2 = r
            for s in range(r + 1, r2):
                if free[p, s] < free[p, k2]:
                    k2 = s
            start2 = tick if tick > a else a
            if free[p, k2] > start2:
                start2 = free[p, k2]
            if start2 < start:
                start, k = start2, k2
    return k, start


@njit(cache=True)
def _simulate_pools(arrival, pool, modality, service, max_batch, plan_t, plan_r, period, neighbour, threshold,
                    delay, cv, dist, seed, finish, served_by, busy, batch_count):
    np.random.seed(seed)
    n = arrival.shape[0]
    pools = plan_r.shape[0]
    servers = 1
    for p in range(pools):
        for r in plan_r[p]:
            if r > servers:
                servers = r
    free = np.zeros((pools, servers))
    members = np.empty((pools, max_batch), np.int64)
    ob_k = np.zeros(pools, np.int64)
    ob_start = np.zeros(pools)
    ob_count = np.zeros(pools, np.int64)
    sigma = math.sqrt(math.log(1.0 + cv * cv)) if cv > 0 else 0.0
    mu = -0.5 * sigma * sigma
    queue = np.empty(n, np.int64)  # spilled studies, FIFO (a constant delay keeps them in time order)
    # the two candidates of ``route`` (home, neighbour): always up in the plan, the neighbour
    # ``delay`` away; the budget is any positive number (the threshold is a fraction of it)
    cand_up = np.ones(2, np.bool_)
    cand_wait = np.zeros(2)
    cand_transfer = np.zeros(2)
    cand_transfer[1] = delay
    budget = threshold if threshold > 0 else 1.0
    q_head = 0
    q_tail = 0
    i = 0
    while i < n or q_head < q_tail:
        spilled = q_head < q_tail and (i >= n or arrival[queue[q_head]] + delay <= arrival[i])
        if spilled:
            s = queue[q_head]
            q_head += 1
            p = served_by[s]
            a = arrival[s] + delay
        else:
            s = i
            i += 1
            p = pool[s]
            a = arrival[s]
        if ob_count[p] > 0 and (a > ob_start[p] or ob_count[p] >= max_batch):
            _close(p, members, ob_k, ob_start, ob_count, free, modality, service, sigma, mu, dist, finish, busy,
                   batch_count)
        if ob_count[p] > 0:
            k, start = ob_k[p], ob_start[p]
        else:
            k, start = _place(p, a, free, plan_t, plan_r, period)
        if not spilled and start - a > threshold and neighbour[p] >= 0:
            # Past the threshold: the neighbour's wait decides (below threshold ``route``
            # keeps the study home without looking, so neither does the simulation).
            q = neighbour[p]
            there = a + delay
            if ob_count[q] > 0 and (a > ob_start[q] or ob_count[q] >= max_batch):
                # nothing from time a on can join q's open batch: close it now
                _close(q, members, ob_k, ob_start, ob_count, free, modality, service, sigma, mu, dist, finish, busy,
                       batch_count)
            if ob_count[q] > 0 and there <= ob_start[q]:
                wait_q = ob_start[q] - there
            elif ob_count[q] > 0:  # the open batch will have started: its replica is free at its expected end
                kept = free[q, ob_k[q]]
                end_q = ob_start[q]
                for m in range(ob_count[q]):
                    end_q += service[modality[members[q, m]], ob_count[q]]
                free[q, ob_k[q]] = end_q
                k_q, start_q = _place(q, there, free, plan_t, plan_r, period)
                free[q, ob_k[q]] = kept
                wait_q = start_q - there
            else:
                k_q, start_q = _place(q, there, free, plan_t, plan_r, period)
                wait_q = start_q - there
            cand_wait[0] = start - a
            cand_wait[1] = wait_q
            choice, _ = _route(cand_up, cand_wait, cand_transfer, budget, 1.0 * threshold / budget, True, False)
            if choice == 1:
                served_by[s] = q
                queue[q_tail] = s
                q_tail += 1
                continue
        served_by[s] = p
        if ob_count[p] == 0:
            ob_k[p] = k
            ob_start[p] = start
        members[p, ob_count[p]] = s
        ob_count[p] += 1
    for p in range(pools):
        _close(p, members, ob_k, ob_start, ob_count, free, modality, service, sigma, mu, dist, finish, busy,
               batch_count)


def simulate_pools(arrival: np.ndarray, pool: np.ndarray, modality: np.ndarray, service: np.ndarray, *,
                   plan_t: np.ndarray, plan_r: np.ndarray, period_s: float = 0.0, neighbour: np.ndarray | None = None,
                   spill_wait_s: float = math.inf, delay_s: float = 0.0, cv: float = 0.0, exponential: bool = False,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Several pools replayed together, with spill-over to a neighbour pool.

    ``arrival`` sorted over all pools, ``pool`` each study's own pool (index into the rows of
    ``plan_r``: replicas per tick of each pool, ticks ``plan_t`` shared), ``neighbour[p]`` the
    pool p spills to (-1: none). A study whose wait at its own pool would exceed ``spill_wait_s``
    goes to the neighbour, reaching it ``delay_s`` later, when the neighbour's expected wait plus
    the delay is shorter than the wait at home; a spilled study does not spill again.
    Returns finish times (of the serving pool, so a spilled study's includes the delay), the
    pool that served each study, busy replica-seconds per pool and batches by size per pool.
    """
    arrival = np.ascontiguousarray(arrival, np.float64)
    n = len(arrival)
    if n and np.any(np.diff(arrival) < 0):
        raise ValueError("arrivals must be sorted")
    if spill_wait_s < 0 or delay_s < 0 or math.isnan(spill_wait_s) or math.isnan(delay_s):
        raise ValueError(f"spill-over wait threshold and delay must be non-negative seconds, got "
                         f"{spill_wait_s} and {delay_s}")
    plan_r = np.ascontiguousarray(np.atleast_2d(plan_r), np.int64)
    pools = plan_r.shape[0]
    neighbour = np.full(pools, -1, np.int64) if neighbour is None else np.ascontiguousarray(neighbour, np.int64)
    if neighbour.shape != (pools,) or np.any(neighbour >= pools) or np.any(neighbour == np.arange(pools)):
        raise ValueError(f"neighbour must name another pool (0..{pools - 1}) or -1 for each of the {pools} pools")
    pool = np.ascontiguousarray(pool, np.int64)
    if n and (pool.min() < 0 or pool.max() >= pools):
        raise ValueError(f"pool indices must lie in 0..{pools - 1}")
    service = np.ascontiguousarray(service, np.float64)
    max_batch = service.shape[1] - 1
    finish = np.empty(n)
    served_by = np.empty(n, np.int64)
    busy = np.zeros(pools)
    batch_count = np.zeros((pools, max_batch + 1), np.int64)
    _simulate_pools(arrival, pool, np.ascontiguousarray(modality, np.int64), service, max_batch,
                    np.ascontiguousarray(plan_t, np.float64), plan_r, float(period_s), neighbour,
                    float(min(spill_wait_s, 1e300)), float(delay_s), float(cv), 1 if exponential else 0,
                    int(seed) % (2**32), finish, served_by, busy, batch_count)
    return finish, served_by, busy, batch_count


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
