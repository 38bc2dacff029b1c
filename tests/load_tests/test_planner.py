"""The capacity planner: arrivals, the queueing core against closed forms, bad input, the report."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mosmedai_load import arrivals, capacity
from mosmedai_load.config import (
    DEFAULT_PROFILE,
    DEFAULT_REGIONS,
    PlanningInputError,
    check_profile_covers,
    load_profile,
    load_regions,
    make_scenario,
)
from mosmedai_load.queueing import erlang_c, mmc_wait_quantile, simulate

pytestmark = pytest.mark.skipif(not DEFAULT_REGIONS.exists(), reason=f"{DEFAULT_REGIONS} (shared data) is missing")


@pytest.fixture(scope="module")
def regions():
    return load_regions()


def small(regions, **kwargs):
    defaults = dict(regional_studies_per_quarter=400_000, moscow_studies_per_month=100_000, days=14)
    return make_scenario(regions=regions, **(defaults | kwargs))


def test_default_scenario_is_75_regions_by_population(regions):
    scenario = make_scenario(regions=regions)
    assert len(scenario.connected) == 75 and "RU-MOW" not in scenario.connected
    assert math.isclose(sum(scenario.shares.values()), 1.0)
    assert scenario.shares["RU-MOS"] > scenario.shares["RU-KGD"] > 0
    # 3.2 M regional per quarter + 2 M a month for Moscow: about 9.2 M a quarter
    assert 9.0e6 < sum(scenario.region_totals().values()) < 9.4e6
    assert all(r.district for r in regions.values()), "every subject has a federal district"


def test_arrivals_reproduce_totals_and_daily_curve(regions):
    scenario = small(regions, connected=["RU-SPE", "RU-KGD", "RU-KAM", "RU-PRI", "RU-NVS"])
    totals = scenario.region_totals()
    pools = arrivals.generate(scenario, seed=1)
    for code, pool in pools.items():
        assert len(pool) == round(totals[code]), code
        assert np.all(np.diff(pool.time_s) >= 0)
        assert pool.time_s.min() >= 0 and pool.time_s.max() < scenario.days * 86400
    # Kamchatka (UTC+12) and Kaliningrad (UTC+2) both follow the curve in their *local* time
    curve = np.asarray(scenario.weekday_curve) / sum(scenario.weekday_curve)
    for code in ("RU-MOW", "RU-KGD", "RU-KAM"):
        offset = regions[code].utc_offset_hours
        local = pools[code].time_s + offset * 3600
        weekday = (local // 86400).astype(int) % 7 < 5
        hist = np.bincount(((local[weekday] % 86400) // 3600).astype(int), minlength=24) / weekday.sum()
        tolerance = 5 * np.sqrt(curve / weekday.sum()) + 1e-3  # 5 sigma of a multinomial share
        assert np.all(np.abs(hist - curve) < tolerance), (code, hist - curve)
    # weekend days carry the weekend factor of a working day's volume
    mow = pools["RU-MOW"].time_s + 3 * 3600
    per_day = np.bincount((mow // 86400).astype(int), minlength=15)[:14]
    ratio = per_day[[5, 6, 12, 13]].mean() / per_day[[0, 1, 2, 3, 4, 7, 8, 9, 10, 11]].mean()
    assert abs(ratio - scenario.weekend_factor) < 0.03
    # growth scales the totals
    grown = small(regions, growth=1.5)
    assert math.isclose(sum(grown.region_totals().values()), 1.5 * sum(totals.values()))


@pytest.mark.parametrize("c,lam,mu", [(1, 0.7, 1.0), (4, 3.0, 1.0), (16, 13.6, 1.0)])
def test_queueing_core_agrees_with_mmc(c, lam, mu):
    rng = np.random.default_rng(c)
    n = 400_000
    arrival = np.cumsum(rng.exponential(1 / lam, n))
    service = np.array([[1 / mu, 1 / mu]])  # max batch 1: plain M/M/c
    finish, busy, batches = simulate(arrival, np.zeros(n, np.int8), service, replicas=c, exponential=True, seed=7)
    wait = finish - arrival  # response time
    # response = wait + service; we recover the wait with the exponential service's mean
    mean_wait = wait.mean() - 1 / mu
    expected_wait = erlang_c(c, lam, mu) / (c * mu - lam)
    assert abs(mean_wait - expected_wait) < 0.08 * expected_wait + 0.01, (mean_wait, expected_wait)
    assert abs(busy / arrival[-1] / c - lam / (c * mu)) < 0.01  # utilisation
    assert batches[1] == n


def test_queueing_core_response_quantile_matches_mm1():
    # M/M/1: the response time is exponential with rate mu - lambda; p95 = ln(20) / (mu - lambda)
    lam, mu, n = 0.8, 1.0, 400_000
    rng = np.random.default_rng(3)
    arrival = np.cumsum(rng.exponential(1 / lam, n))
    finish, _, _ = simulate(arrival, np.zeros(n, np.int8), np.array([[1 / mu, 1 / mu]]), replicas=1,
                            exponential=True, seed=2)
    p95 = np.percentile(finish - arrival, 95)
    assert abs(p95 / (math.log(20) / (mu - lam)) - 1) < 0.08
    # and the closed-form helpers agree with each other: M/M/1's Erlang C is rho
    assert math.isclose(erlang_c(1, lam, mu), lam / mu)
    assert math.isclose(mmc_wait_quantile(1, lam, mu, 0.95), math.log(0.8 / 0.05) / (mu - lam))


def test_batching_and_replica_plan():
    # 10 studies at once, batch of up to 4 at 1 s per study per batch-size column, 1 replica
    arrival = np.zeros(10)
    service = np.array([[1.0, 1.0, 0.6, 0.5, 0.4]])  # per study in a batch of b: batching is cheaper
    finish, busy, batches = simulate(arrival, np.zeros(10, np.int8), service, replicas=1)
    # all ten wait at t=0: batches of 4, 4 and 2 (0.4 s and 0.6 s per study)
    assert batches.tolist() == [0, 0, 1, 0, 2]
    assert math.isclose(finish[0], 1.6) and math.isclose(finish[-1], 1.6 + 1.6 + 1.2)
    # a plan: 1 replica for the first 100 s, then 3; a queue built early drains faster afterwards
    arrival = np.linspace(0, 200, 600)
    service = np.array([[0.5, 0.5]])
    one, _, _ = simulate(arrival, np.zeros(600, np.int8), service, replicas=1)
    planned, _, _ = simulate(arrival, np.zeros(600, np.int8), service, plan_t=np.array([0.0, 100.0]),
                             plan_r=np.array([1, 3]))
    assert (planned - arrival).max() < (one - arrival).max()


def test_planner_scales_with_load_through_the_operator_policy(regions):
    scenario = small(regions, days=7, regional_studies_per_quarter=3.2e6, moscow_studies_per_month=2e6)
    profile = load_profile(DEFAULT_PROFILE)
    result = capacity.run_design("national", scenario, profile, progress=False)
    pool = result.pools[0]
    assert pool.gpus > 1 and min(pool.plan) < max(pool.plan), "the pool grows by day and shrinks at night"
    assert pool.meets_slo and 0 < pool.utilisation <= 1
    regional = capacity.run_design("regional", scenario, profile, progress=False)
    assert regional.gpus > pool.gpus  # a pool per region needs more GPUs than one national pool
    assert sum(p.studies for p in regional.pools) == pool.studies


def test_bad_inputs_fail_with_clear_messages(regions, tmp_path, capsys):
    with pytest.raises(PlanningInputError, match=r"unknown region codes \['RU-XXX'\]"):
        make_scenario(regions=regions, connected=["RU-SPE", "RU-XXX"])
    with pytest.raises(PlanningInputError, match="shares sum to 0.900000, not 1"):
        make_scenario(regions=regions, connected=["RU-SPE", "RU-KGD"], shares={"RU-SPE": 0.5, "RU-KGD": 0.4})
    with pytest.raises(PlanningInputError, match="regional_studies_per_quarter must be a non-negative number, got -5"):
        make_scenario(regions=regions, regional_studies_per_quarter=-5)
    with pytest.raises(PlanningInputError, match="unknown modalities"):
        make_scenario(regions=regions, mix_shares={"ultrasound": 1.0})
    profile = tmp_path / "cpu.yaml"
    profile.write_text("gpu_types:\n  cpu:\n    tools:\n      cxr_nodule: {batch: [1], ms: [20]}\n")
    loaded = load_profile(profile)
    with pytest.raises(PlanningInputError, match=r"no service times for tools \['cxr_opacity', 'cxr_pneumothorax'\]"):
        check_profile_covers(loaded, make_scenario(regions=regions, mix_shares={"chest_xray": 1.0}).mix)
    # through the command: exit status 2 and the message on stderr, nothing simulated
    assert capacity.main(["--connected", "RU-SPE,RU-ZZZ", "--no-report"]) == 2
    assert "unknown region codes ['RU-ZZZ']" in capsys.readouterr().err
    assert capacity.main(["--moscow-per-month", "-1", "--no-report"]) == 2
    assert "moscow_studies_per_month must be a non-negative number" in capsys.readouterr().err
    assert capacity.main(["--profile", str(profile), "--no-report"]) == 2
    assert "no service times for tools" in capsys.readouterr().err
    assert capacity.main(["--shares", "RU-SPE=0.7,RU-KGD=0.7", "--no-report"]) == 2
    assert "shares sum to 1.400000, not 1" in capsys.readouterr().err


def test_report_from_a_small_scenario(tmp_path, capsys):
    out = tmp_path / "report"
    assert capacity.main(["--days", "7", "--regional-per-quarter", "200000", "--moscow-per-month", "50000",
                          "--out", str(out), "--designs", "regional,district,national", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "a pool per region" in text and "one national pool" in text
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # load by hour, replicas, time-to-result, cost
    for png in ("national_load", "replicas", "time_to_result", "cost"):
        assert (out / f"{png}.png").stat().st_size > 5000
        assert f"({png}.png)" in (out / "report.md").read_text()
    assert "RU-MOW" in html and "illustrative" in html


def test_a_tighter_slo_buys_more_gpus(regions):
    # CT series take 20 s of GPU and 3 s of upload: a 30 s p95 needs queues kept short
    scenario = small(regions, days=7, regional_studies_per_quarter=3.2e6, moscow_studies_per_month=2e6)
    profile = load_profile(DEFAULT_PROFILE)
    loose = capacity.run_design("national", scenario, profile, progress=False).pools[0]
    scenario.slo_p95_s = 30.0
    tight = capacity.run_design("national", scenario, profile, progress=False).pools[0]
    assert tight.meets_slo and tight.p95_s <= 30.0
    assert tight.target_utilisation < loose.target_utilisation and tight.gpus > loose.gpus
