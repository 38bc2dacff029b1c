"""Routing decisions: which pool runs a study's tool, or whether the study is refused.

``route`` is the one decision function. The router calls it for every image and tool; the
capacity planner's ``district_spill`` design compiles the very same function with numba
(``mosmedai_load.queueing``), so the planner simulates exactly what the router does.

The policy (DESIGN.md, "Overload, routing and drain"):
- home: the first candidate, the home pool, while it is up and its expected wait is within
  ``spill_fraction`` of the study's budget (its deadline, or the SLO for asynchronous work);
- spill: past that, the up candidate with the shortest expected wait plus transfer time, when
  that is shorter than waiting at home; at most one spill hop (``may_spill`` is false for a
  study that already spilled);
- failover: the home pool is down (ejected, not ready): the nearest up candidate;
- shed: no candidate is up, or (``may_shed``: synchronous, not urgent) the chosen pool
  cannot start the study within its budget. Shedding is decided before any waiting.

Priority classes order work in the router's queues and in Triton: urgent (CT brain: a stroke
CT must not wait behind a screening backlog, and is never shed), routine, screening
(fluorography, mammography).
"""

from __future__ import annotations

HOME, SPILL, FAILOVER, SHED = 0, 1, 2, -1
ROUTE_NAMES = {HOME: "home", SPILL: "spill", FAILOVER: "failover"}

URGENT, ROUTINE, SCREENING = 0, 1, 2
PRIORITY_NAMES = ("urgent", "routine", "screening")
#: priority class of each family; a family not named here (and a BYO tool) is routine
FAMILY_PRIORITY = {"ct_brain": URGENT, "fluorography": SCREENING, "mammography": SCREENING}


def priority_of(spec) -> int:
    """The priority class of a tool (a ToolSpec of the catalog)."""
    return FAMILY_PRIORITY.get(getattr(spec.family, "name", ""), ROUTINE)


def route(up, wait_s, transfer_s, budget_s: float, spill_fraction: float, may_spill: bool,
          may_shed: bool) -> tuple[int, int]:
    """(candidate index, HOME|SPILL|FAILOVER), or (-1, SHED).

    ``up[i]``, ``wait_s[i]`` (expected wait, s) and ``transfer_s[i]`` (one-way transfer, s)
    describe the candidates of one (region, tool), home first. Plain loops over sequences:
    numba compiles this function unchanged for the planner.
    """
    n = len(up)
    if n == 0:
        return -1, SHED
    if up[0]:
        best = 0
        kind = HOME
        best_cost = wait_s[0]
        if may_spill and wait_s[0] > spill_fraction * budget_s:
            for i in range(1, n):
                cost = wait_s[i] + transfer_s[i]
                if up[i] and cost < best_cost:
                    best = i
                    best_cost = cost
                    kind = SPILL
    else:
        best = -1
        best_cost = 0.0
        for i in range(1, n):
            if up[i]:
                best = i
                best_cost = wait_s[i] + transfer_s[i]
                break
        if best < 0:
            return -1, SHED
        kind = FAILOVER
    if may_shed and best_cost > budget_s:
        return -1, SHED
    return best, kind
