"""Study arrivals of a quarter: each region's total spread over its own working-hour curve.

A region's studies over the simulated days are a non-homogeneous Poisson process whose
rate follows the weekday curve in the region's *local* time (weekends scaled by the
weekend factor). Conditional on the total, such a process is the total's points drawn
independently from the rate's shape, so we draw exactly ``round(total)`` points: hour bins
by a multinomial over the curve, then uniform within the bin. Totals are exact; the daily
curve holds in expectation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mosmedai_load.config import Scenario

HOUR_S = 3600.0


def hourly_weights(scenario: Scenario, utc_offset_hours: int) -> np.ndarray:
    """Relative rate per UTC hour bin of the simulated days (length days*24), summing to 1."""
    hours = np.arange(scenario.days * 24)
    local = hours + utc_offset_hours
    local_hour, local_day = local % 24, local // 24
    weekday = (scenario.start_weekday + local_day) % 7
    curve = np.asarray(scenario.weekday_curve, float)
    weights = curve[local_hour] * np.where(weekday < 5, 1.0, scenario.weekend_factor)
    return weights / weights.sum()


def expected_hourly(scenario: Scenario) -> dict[str, np.ndarray]:
    """Expected studies per UTC hour bin, per region of the scenario's totals."""
    return {code: total * hourly_weights(scenario, scenario.regions[code].utc_offset_hours)
            for code, total in scenario.region_totals().items()}


@dataclass
class Arrivals:
    """Studies of one pool, in arrival order."""

    time_s: np.ndarray  # float64, seconds since the start of day 0 (UTC)
    modality: np.ndarray  # int8 index into scenario.mix
    region: np.ndarray  # int16 index into `codes`
    codes: list[str]

    def __len__(self) -> int:
        return len(self.time_s)


def region_arrivals(scenario: Scenario, code: str, total: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(round(total))
    weights = hourly_weights(scenario, scenario.regions[code].utc_offset_hours)
    counts = rng.multinomial(n, weights)
    times = np.repeat(np.arange(len(weights), dtype=np.float64) * HOUR_S, counts) + rng.random(n) * HOUR_S
    shares = np.array([m.share for m in scenario.mix])
    modality = rng.choice(len(shares), size=n, p=shares / shares.sum()).astype(np.int8)
    return times, modality


def generate(scenario: Scenario, seed: int = 0, pools: dict[str, list[str]] | None = None) -> dict[str, Arrivals]:
    """Arrivals per pool (default: a pool per region). Regions' streams are independent:
    a region's stream is the same whatever pool it is merged into (seeded per region)."""
    totals = scenario.region_totals()
    pools = pools or {code: [code] for code in totals}
    per_region: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, code in enumerate(sorted(totals)):
        rng = np.random.default_rng([seed, i])
        per_region[code] = region_arrivals(scenario, code, totals[code], rng)
    out: dict[str, Arrivals] = {}
    for pool, codes in pools.items():
        codes = [c for c in codes if c in per_region]
        if not codes:
            continue
        times = np.concatenate([per_region[c][0] for c in codes])
        modality = np.concatenate([per_region[c][1] for c in codes])
        region = np.concatenate([np.full(len(per_region[c][0]), i, np.int16) for i, c in enumerate(codes)])
        order = np.argsort(times, kind="stable") if len(codes) > 1 else np.argsort(times)
        out[pool] = Arrivals(times[order], modality[order], region[order], codes)
    return out
