"""The routing decision that the router and the planner share (mosmedai.serving.routing.route)."""

import math

import pytest

from mosmedai.serving.routing import FAILOVER, HOME, SHED, SPILL, SCREENING, URGENT, ROUTINE, priority_of, route
from mosmedai.catalog.tools import CATALOG

BUDGET, FRACTION = 10.0, 0.25  # spill past 2.5 s of expected wait


def decide(up, wait, transfer=None, may_spill=True, may_shed=True):
    return route(up, wait, transfer or [0.0] * len(up), BUDGET, FRACTION, may_spill, may_shed)


def test_home_while_its_wait_is_within_the_spill_threshold():
    assert decide([True, True], [2.0, 0.0]) == (0, HOME)


def test_spill_to_the_shortest_wait_plus_transfer_past_the_threshold():
    assert decide([True, True, True], [5.0, 1.0, 0.5], [0.0, 0.1, 2.0]) == (1, SPILL)
    # the neighbour is no better once its transfer is counted: stay home
    assert decide([True, True], [5.0, 1.0], [0.0, 4.5]) == (0, HOME)
    # a study that already spilled does not spill again
    assert decide([True, True], [5.0, 1.0], may_spill=False) == (0, HOME)


def test_failover_to_the_nearest_up_pool_when_home_is_down():
    assert decide([False, False, True, True], [0.0, 0.0, 3.0, 0.0]) == (2, FAILOVER)
    assert decide([False, False], [0.0, 0.0]) == (-1, SHED)


def test_shed_only_what_no_pool_can_start_within_the_budget_and_never_when_told_not_to():
    assert decide([True, True], [12.0, 11.0]) == (-1, SHED)
    assert decide([True, True], [12.0, 11.0], may_shed=False) == (1, SPILL)
    assert decide([True], [math.inf], may_shed=False) == (0, HOME)


def test_priority_classes_follow_the_family():
    assert priority_of(CATALOG["ctb_hemorrhage"]) == URGENT
    assert priority_of(CATALOG["flg_triage"]) == priority_of(CATALOG["mg_mass"]) == SCREENING
    assert priority_of(CATALOG["cxr_nodule"]) == priority_of(CATALOG["ctc_covid"]) == ROUTINE


def test_the_planner_compiles_the_same_function():
    from mosmedai_load import queueing

    if not queueing.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    assert queueing._route.py_func is route
    assert queueing._route([True, True], [5.0, 1.0], [0.0, 0.1], BUDGET, FRACTION, True, False) == (1, SPILL)
