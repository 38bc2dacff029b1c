"""Spill-over between district pools: conservation, effect, no effect below the threshold, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from mosmedai_load import capacity
from mosmedai_load.config import DEFAULT_DISTRICTS, DEFAULT_REGIONS, PlanningInputError, SpillOver, load_neighbours
from mosmedai_load.queueing import simulate, simulate_pools

SERVICE = np.array([[1.0, 1.0, 0.6, 0.5]])  # one modality, batches up to 3
PLAN_T = np.zeros(1)


def two_pools(load0: float, load1: float, n_seconds: float = 20_000.0, seed: int = 0):
    """Poisson arrivals at two pools of one replica each (load = arrivals/s x 1 s)."""
    rng = np.random.default_rng(seed)
    times, pools = [], []
    for p, load in enumerate((load0, load1)):
        if load > 0:
            t = np.cumsum(rng.exponential(1 / load, int(load * n_seconds)))
            times.append(t)
            pools.append(np.full(len(t), p))
    t, pool = np.concatenate(times), np.concatenate(pools)
    order = np.argsort(t, kind="stable")
    return t[order], pool[order]


def run(t, pool, service=SERVICE, **kwargs):
    return simulate_pools(t, pool, np.zeros(len(t), np.int8), service, plan_t=PLAN_T,
                          plan_r=np.array([[1], [1]]), **kwargs)


def test_spill_over_conserves_studies_and_relieves_an_overloaded_pool():
    # pool 0 is past saturation (1.1 studies/s on 1 s each, batching does not help); pool 1 idles
    flat = np.array([[1.0, 1.0, 1.0, 1.0]])
    t, pool = two_pools(1.1, 0.05)
    finish0, served0, _, _ = run(t, pool, flat)
    finish, served, busy, batches = run(t, pool, flat, neighbour=np.array([1, 0]), spill_wait_s=5.0, delay_s=2.0)
    assert np.all(served0 == pool)
    out = np.array([np.sum((pool == p) & (served != p)) for p in (0, 1)])
    into = np.array([np.sum((served == p) & (pool != p)) for p in (0, 1)])
    assert out.sum() == into.sum() > 0 and out[0] == into[1]  # every study served once, by one pool
    assert np.all(np.isfinite(finish)) and np.all(batches.sum(axis=1) > 0)
    assert sum(int((np.arange(batches.shape[1]) * batches[p]).sum()) for p in (0, 1)) == len(t)
    own = pool == 0
    p95_before = np.percentile(finish0[own] - t[own], 95)
    p95_after = np.percentile(finish[own] - t[own], 95)
    assert p95_after < 0.2 * p95_before and p95_after < 10.0, (p95_before, p95_after)
    spilled = served != pool
    assert np.all(finish[spilled] - t[spilled] >= 2.0 + 1.0 - 1e-9)  # transfer + the service
    assert busy.sum() == pytest.approx(len(t) * 1.0)  # each study's second of service is spent once


def test_spill_over_does_nothing_below_the_threshold():
    t, pool = two_pools(0.3, 0.3, seed=1)
    plain = [simulate(t[pool == p], np.zeros(int((pool == p).sum()), np.int8), SERVICE, replicas=1)[0] for p in (0, 1)]
    finish, served, _, _ = run(t, pool, neighbour=np.array([1, 0]), spill_wait_s=1e6, delay_s=2.0)
    assert np.all(served == pool)
    for p in (0, 1):
        assert np.array_equal(finish[pool == p], plain[p])  # exactly the independent pools
    # a threshold no wait reaches: also untouched
    waits = np.concatenate([plain[p] - t[pool == p] for p in (0, 1)])
    finish2, served2, _, _ = run(t, pool, neighbour=np.array([1, 0]), spill_wait_s=float(waits.max()) + 1, delay_s=0.0)
    assert np.all(served2 == pool) and np.array_equal(finish2, finish)


def test_bad_spill_over_input_fails_clearly(tmp_path):
    with pytest.raises(PlanningInputError, match="spill-over wait threshold must be a non-negative fraction of the SLO, got -0.5"):
        SpillOver(wait_fraction=-0.5)
    with pytest.raises(PlanningInputError, match="transfer delay must be non-negative seconds"):
        SpillOver(delay_s=-1)
    bad = tmp_path / "districts.csv"
    bad.write_text("iso_code,district,district_name,neighbour\nRU-MOW,CFD,Central,NWF\nRU-SPE,NWF,North-West,XYZ\n")
    with pytest.raises(PlanningInputError, match=r"the neighbour of NWF, 'XYZ', is not a district"):
        load_neighbours(bad)
    with pytest.raises(PlanningInputError, match=r"the neighbour of CFD, 'ZZZ', is not a district"):
        load_neighbours(DEFAULT_DISTRICTS, {"CFD": "ZZZ"})
    with pytest.raises(PlanningInputError, match="names itself"):
        load_neighbours(DEFAULT_DISTRICTS, {"CFD": "CFD"})
    with pytest.raises(ValueError, match="must be non-negative seconds"):
        run(*two_pools(0.1, 0.1), neighbour=np.array([1, 0]), spill_wait_s=-1.0)
    assert load_neighbours()["CFD"] == "NWF" and len(load_neighbours()) == 8


@pytest.mark.skipif(not DEFAULT_REGIONS.exists(), reason=f"{DEFAULT_REGIONS} (shared data) is missing")
def test_planner_design_with_spill_over(tmp_path, capsys):
    # the command: bad neighbours and thresholds stop it with status 2, before any simulation
    assert capacity.main(["--designs", "district_spill", "--spill-wait-fraction", "-1", "--no-report"]) == 2
    assert "spill-over wait threshold must be a non-negative fraction" in capsys.readouterr().err
    assert capacity.main(["--designs", "district_spill", "--neighbours", "CFD=XXX", "--no-report"]) == 2
    assert "'XXX', is not a district" in capsys.readouterr().err
    # a small week: the district design and its spill-over twin, per-pool in/out in the report
    out = tmp_path / "report"
    assert capacity.main(["--days", "7", "--regional-per-quarter", "2000000", "--moscow-per-month", "1000000",
                          "--designs", "district_spill", "--slo-p95-s", "60", "--spill-wait-fraction", "0.1",
                          "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "per district, with spill-over" in text and "a pool per federal district" in text
    import json

    designs = {d["design"]: d for d in json.loads((out / "results.json").read_text())["designs"]}
    pools = designs["district_spill"]["pools"]
    assert sum(p["spilled_out"] for p in pools) == sum(p["spilled_in"] for p in pools)
    assert sum(p["studies"] for p in pools) == sum(p["studies"] for p in designs["district"]["pools"])
    assert "Spill-over between district pools" in (out / "report.md").read_text()
