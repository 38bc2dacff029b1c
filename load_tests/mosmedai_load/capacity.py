"""`mosmedai capacity`: how many GPUs each regional pool needs, what they cost, and which design.

For each design (a pool per region; a pool per federal district; one national pool) and each
pool: generate the quarter's studies (arrivals.py), plan the pool's replicas over a week with
the GpuPool operator's own scaling policy (``mosmedai_operator.policy.decide`` on the
images/s target, fed the expected load at each decision), replay the whole quarter study by
study through the queueing core (queueing.py) and keep the least GPU-hungry plan whose p95
time-to-result meets the SLO.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from mosmedai_load import arrivals as arrivals_mod
from mosmedai_load.config import (
    DEFAULT_DISTRICTS,
    DEFAULT_PROFILE,
    DEFAULT_REGIONS,
    GpuProfile,
    PlanningInputError,
    Scenario,
    SpillOver,
    check_profile_covers,
    load_neighbours,
    load_profile,
    load_regions,
    make_scenario,
    parse_mapping,
)
from mosmedai_load.queueing import simulate, simulate_pools
from mosmedai_load.report import DESIGN_TITLES, spill_table, write_capacity_report

WEEK_S = 7 * 86400.0
#: Fractions of a replica's batch-1 throughput the operator's images/s target is set to,
#: tried from the most economical down until the SLO holds.
UTILISATION_TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
DESIGNS = ("regional", "district", "district_spill", "national")


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal, or when forced)."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        self.total, self.done, self.label = max(total, 1), 0, label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.perf_counter()

    def step(self, what: str = "") -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            elapsed = time.perf_counter() - self.started
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                             f"{elapsed:5.1f}s {what[:24]:24s}")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def service_table(scenario: Scenario, profile: GpuProfile) -> np.ndarray:
    """Seconds one study of each modality takes on a replica in a batch of b (columns 0..max_batch)."""
    return mix_service_table(scenario.mix, profile)


def mix_service_table(mix, profile: GpuProfile) -> np.ndarray:
    table = np.zeros((len(mix), profile.max_batch + 1))
    for m, modality in enumerate(mix):
        for b in range(1, profile.max_batch + 1):
            table[m, b] = sum(items * profile.tools[tool].per_item_ms(b) for tool, items in modality.tools.items()) / 1000
    table[:, 0] = table[:, 1]
    return table


def pools_for(design: str, scenario: Scenario) -> dict[str, list[str]]:
    codes = sorted(scenario.region_totals())
    if design == "regional":
        return {code: [code] for code in codes}
    if design in ("district", "district_spill"):
        pools: dict[str, list[str]] = {}
        for code in codes:
            district = scenario.regions[code].district
            if not district:
                raise PlanningInputError(f"region {code} has no federal district in the districts file")
            pools.setdefault(f"RU-{district}", []).append(code)
        return pools
    if design == "national":
        return {"RU-ALL": codes}
    raise PlanningInputError(f"unknown design {design!r} (known: {', '.join(DESIGNS)})")


def pool_spec(pool: str, zone: str, per_replica: float, min_replicas: int, max_replicas: int):
    from mosmedai_operator.spec import GpuPoolSpec

    return GpuPoolSpec.model_validate({
        "region": pool, "timeZone": zone, "tools": ["planned"],
        "replicas": {"min": min_replicas, "max": max_replicas},
        "targets": {"imagesPerSecondPerReplica": max(per_replica, 0.01)},
    })


def plan_week(spec, rate_per_hour: np.ndarray, tick_s: float, warmup_days: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Replicas per tick over one week (the quarter's second week), from the operator's policy.

    ``rate_per_hour``: expected studies/s of the pool in each UTC hour bin of the quarter. The
    policy sees at each tick the expected images/s of that hour, as Prometheus would report it.
    """
    from mosmedai_operator.policy import MetricSample, decide

    origin = datetime(2026, 1, 5, tzinfo=timezone.utc)  # a Monday, as day 0 of the scenario
    ticks_per_week = int(WEEK_S // tick_s)
    warmup = int(warmup_days * 86400 // tick_s)
    hours = len(rate_per_hour)
    max_age = timedelta(seconds=tick_s + 1)
    window = timedelta(seconds=spec.scale_down.stabilization_window_seconds)
    current = spec.replicas.min or 1
    samples: list = []
    plan = np.empty(ticks_per_week, np.int64)
    first = int(WEEK_S // tick_s) - warmup  # start a day before the second week
    for i in range(first, first + warmup + ticks_per_week):
        t = i * tick_s
        now = origin + timedelta(seconds=t)
        hour = int(t // 3600)
        if hour >= hours:  # a scenario shorter than two weeks: the same hour of the week earlier
            hour = hour % 168 if hours >= 168 else hour % hours
        rate = float(rate_per_hour[hour])
        samples.append(MetricSample(now, images_per_second=rate))
        while len(samples) > 2 and samples[1].time <= now - window:
            samples.pop(0)
        current = max(decide(spec, current, samples, now, max_sample_age=max_age).desired, 1)
        if i >= first + warmup:
            plan[i - first - warmup] = current
    return np.arange(ticks_per_week) * tick_s, plan


@dataclass
class PoolResult:
    pool: str
    regions: list[str]
    studies: int
    gpus: int  # peak replicas x GPUs per replica: what the pool must be able to hold
    mean_replicas: float
    utilisation: float  # busy replica-seconds / provisioned replica-seconds
    p50_s: float
    p95_s: float
    p99_s: float
    within_slo: float  # fraction of studies at or under the SLO
    meets_slo: bool
    target_utilisation: float
    gpu_hours: float
    cost: float  # provisioned GPU-hours x price
    mean_batch: float
    plan: list[int] = field(repr=False, default_factory=list)  # replicas per tick over the week
    spilled_out: int = 0  # studies of this pool's regions served by the neighbour's pool
    spilled_in: int = 0  # studies of the neighbour districts' regions served here
    neighbour: str = ""  # the pool this one spills to


@dataclass
class DesignResult:
    design: str
    pools: list[PoolResult]
    seconds: float
    p95_s: float
    p99_s: float
    within_slo: float
    ttr_sample: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    notes: list[str] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return sum(p.gpus for p in self.pools)

    @property
    def cost(self) -> float:
        return sum(p.cost for p in self.pools)

    @property
    def gpu_hours(self) -> float:
        return sum(p.gpu_hours for p in self.pools)


def plan_pool(pool: str, codes: list[str], arrivals, scenario: Scenario, profile: GpuProfile, service: np.ndarray,
              overhead_s: np.ndarray, rate_per_hour: np.ndarray, *, tick_s: float, min_replicas: int,
              max_replicas: int, seed: int) -> tuple[PoolResult, np.ndarray]:
    shares = np.array([m.share for m in scenario.mix])
    mu1 = 1.0 / float(shares @ service[:, 1])  # studies/s of one replica at batch 1
    zone = scenario.regions[max(codes, key=lambda c: scenario.regions[c].population_thousands)].time_zone
    horizon = scenario.days * 86400.0
    result = ttr = None
    for target in UTILISATION_TARGETS:
        spec = pool_spec(pool, zone, target * mu1, min_replicas, max_replicas)
        plan_t, plan_r = plan_week(spec, rate_per_hour, tick_s)
        finish, busy, batches = simulate(arrivals.time_s, arrivals.modality, service, plan_t=plan_t, plan_r=plan_r,
                                         period_s=WEEK_S, cv=profile.service_cv, seed=seed)
        ttr = finish - arrivals.time_s + overhead_s[arrivals.modality]
        provisioned = float(plan_r.mean()) * horizon  # replica-seconds over the quarter (weekly plan repeated)
        p50, p95, p99 = (np.percentile(ttr, [50, 95, 99]) if len(ttr) else (0.0, 0.0, 0.0))
        gpus_per_replica = 1
        gpu_hours = provisioned / 3600 * gpus_per_replica
        result = PoolResult(
            pool=pool, regions=codes, studies=len(ttr), gpus=int(plan_r.max()) * gpus_per_replica,
            mean_replicas=float(plan_r.mean()), utilisation=busy / provisioned if provisioned else 0.0,
            p50_s=float(p50), p95_s=float(p95), p99_s=float(p99),
            within_slo=float(np.mean(ttr <= scenario.slo_p95_s)) if len(ttr) else 1.0,
            meets_slo=bool(p95 <= scenario.slo_p95_s), target_utilisation=target, gpu_hours=gpu_hours,
            cost=gpu_hours * profile.cost_per_gpu_hour,
            mean_batch=float((np.arange(len(batches)) * batches).sum() / max(batches.sum(), 1)),
            plan=plan_r.tolist())
        if result.meets_slo:
            break
    return result, ttr


def run_design(design: str, scenario: Scenario, profile: GpuProfile, *, seed: int = 0, tick_s: float = 300.0,
               min_replicas: int = 1, max_replicas: int = 256, progress: bool | None = None,
               spill: SpillOver | None = None) -> DesignResult:
    if design == "district_spill":
        return run_district_spill(scenario, profile, spill or SpillOver(neighbours=load_neighbours()), seed=seed,
                                  tick_s=tick_s, min_replicas=min_replicas, max_replicas=max_replicas, progress=progress)
    started = time.perf_counter()
    pools = pools_for(design, scenario)
    service = service_table(scenario, profile)
    overhead_s = profile.overhead_s(scenario.mix)
    expected = arrivals_mod.expected_hourly(scenario)
    results, samples = [], []
    bar = Progress(len(pools), f"{design:9s}", progress)
    all_ttr = []
    for pool, codes in pools.items():
        arr = arrivals_mod.generate(scenario, seed=seed, pools={pool: codes})[pool]
        rate = sum(expected[c] for c in codes) / 3600.0
        result, ttr = plan_pool(pool, codes, arr, scenario, profile, service, overhead_s, rate, tick_s=tick_s,
                                min_replicas=min_replicas, max_replicas=max_replicas, seed=seed)
        results.append(result)
        all_ttr.append(ttr)
        bar.step(pool)
    ttr = np.concatenate(all_ttr) if all_ttr else np.zeros(0)
    p95, p99 = np.percentile(ttr, [95, 99]) if len(ttr) else (0.0, 0.0)
    rng = np.random.default_rng(seed)
    samples = rng.choice(ttr, size=min(len(ttr), 200_000), replace=False) if len(ttr) else ttr
    return DesignResult(design, results, time.perf_counter() - started, float(p95), float(p99),
                        float(np.mean(ttr <= scenario.slo_p95_s)) if len(ttr) else 1.0, samples)


def run_district_spill(scenario: Scenario, profile: GpuProfile, spill: SpillOver, *, seed: int = 0,
                       tick_s: float = 300.0, min_replicas: int = 1, max_replicas: int = 256,
                       progress: bool | None = None) -> DesignResult:
    """A pool per federal district whose overflow spills to the neighbour district's pool.

    All district pools are replayed together (``queueing.simulate_pools``): a study whose wait
    at its own pool would exceed ``spill.wait_fraction`` x the SLO goes to the neighbour's
    pool, ``spill.delay_s`` later, when the wait there plus the transfer is shorter. Each pool's
    replicas still follow the operator's policy on its *own* expected load (the operator does
    not know about spill-over). Targets: every pool starts at the most economical one; pools
    whose own studies (wherever served) miss the SLO step down, and the whole set is replayed
    again, until all meet it or are at the lowest target.
    """
    started = time.perf_counter()
    pools = pools_for("district_spill", scenario)
    service = service_table(scenario, profile)
    overhead_s = profile.overhead_s(scenario.mix)
    expected = arrivals_mod.expected_hourly(scenario)
    per_pool = arrivals_mod.generate(scenario, seed=seed, pools=pools)
    names = [name for name in pools if name in per_pool]
    index = {name: i for i, name in enumerate(names)}
    notes = []
    neighbour = np.full(len(names), -1, np.int64)
    for i, name in enumerate(names):
        target = spill.neighbours.get(name.removeprefix("RU-"), "")
        if target and f"RU-{target}" in index:
            neighbour[i] = index[f"RU-{target}"]
        elif target:
            notes.append(f"{name} does not spill: its neighbour {target} has no connected region")
    time_s = np.concatenate([per_pool[n].time_s for n in names])
    order = np.argsort(time_s, kind="stable")
    time_s = time_s[order]
    origin = np.concatenate([np.full(len(per_pool[n]), i, np.int64) for i, n in enumerate(names)])[order]
    modality = np.concatenate([per_pool[n].modality for n in names])[order]
    del per_pool
    shares = np.array([m.share for m in scenario.mix])
    mu1 = 1.0 / float(shares @ service[:, 1])
    horizon = scenario.days * 86400.0
    threshold = spill.wait_fraction * scenario.slo_p95_s
    plans: dict[tuple[int, int], np.ndarray] = {}
    plan_t = None

    def plan_of(i: int, level: int) -> np.ndarray:
        nonlocal plan_t
        if (i, level) not in plans:
            codes = pools[names[i]]
            zone = scenario.regions[max(codes, key=lambda c: scenario.regions[c].population_thousands)].time_zone
            rate = sum(expected[c] for c in codes) / 3600.0
            spec = pool_spec(names[i], zone, UTILISATION_TARGETS[level] * mu1, min_replicas, max_replicas)
            plan_t, plans[(i, level)] = plan_week(spec, rate, tick_s)
        return plans[(i, level)]

    levels = [0] * len(names)
    bar = Progress(len(UTILISATION_TARGETS), "district+spill", progress)
    rounds = 0
    while True:
        rounds += 1
        plan_r = np.stack([plan_of(i, level) for i, level in enumerate(levels)])
        finish, served, busy, batches = simulate_pools(
            time_s, origin, modality, service, plan_t=plan_t, plan_r=plan_r, period_s=WEEK_S, neighbour=neighbour,
            spill_wait_s=threshold, delay_s=spill.delay_s, cv=profile.service_cv, seed=seed)
        ttr = finish - time_s + overhead_s[modality]
        p95 = np.array([np.percentile(ttr[origin == i], 95) if np.any(origin == i) else 0.0 for i in range(len(names))])
        failing = [i for i in range(len(names)) if p95[i] > scenario.slo_p95_s and levels[i] < len(UTILISATION_TARGETS) - 1]
        bar.step(f"round {rounds}")
        if not failing:
            break
        for i in failing:
            levels[i] += 1
    results = []
    out_of = origin != served
    for i, name in enumerate(names):
        mine = origin == i
        own = ttr[mine]
        plan = plan_r[i]
        provisioned = float(plan.mean()) * horizon
        p50, p95_i, p99 = np.percentile(own, [50, 95, 99]) if len(own) else (0.0, 0.0, 0.0)
        gpu_hours = provisioned / 3600
        b = batches[i]
        results.append(PoolResult(
            pool=name, regions=pools[name], studies=int(mine.sum()), gpus=int(plan.max()),
            mean_replicas=float(plan.mean()), utilisation=busy[i] / provisioned if provisioned else 0.0,
            p50_s=float(p50), p95_s=float(p95_i), p99_s=float(p99),
            within_slo=float(np.mean(own <= scenario.slo_p95_s)) if len(own) else 1.0,
            meets_slo=bool(p95_i <= scenario.slo_p95_s), target_utilisation=UTILISATION_TARGETS[levels[i]],
            gpu_hours=gpu_hours, cost=gpu_hours * profile.cost_per_gpu_hour,
            mean_batch=float((np.arange(len(b)) * b).sum() / max(b.sum(), 1)), plan=plan.tolist(),
            spilled_out=int((mine & out_of).sum()), spilled_in=int(((served == i) & out_of).sum()),
            neighbour=names[neighbour[i]] if neighbour[i] >= 0 else ""))
    p95_all, p99_all = np.percentile(ttr, [95, 99]) if len(ttr) else (0.0, 0.0)
    rng = np.random.default_rng(seed)
    sample = rng.choice(ttr, size=min(len(ttr), 200_000), replace=False) if len(ttr) else ttr
    notes.append(f"spill-over: wait > {threshold:.0f} s ({spill.wait_fraction:g} x SLO), transfer {spill.delay_s:g} s; "
                 f"{int(out_of.sum()):,} studies spilled ({100 * out_of.mean() if len(ttr) else 0:.3f} %); "
                 f"{rounds} replay(s) of the quarter")
    return DesignResult("district_spill", results, time.perf_counter() - started, float(p95_all), float(p99_all),
                        float(np.mean(ttr <= scenario.slo_p95_s)) if len(ttr) else 1.0, sample, notes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mosmedai capacity", description=__doc__.splitlines()[0])
    p.add_argument("--regions", type=Path, default=DEFAULT_REGIONS, help="regions CSV (iso_code,name,utc_offset_hours,population_thousands)")
    p.add_argument("--districts", type=Path, default=DEFAULT_DISTRICTS, help="iso_code -> federal district CSV")
    p.add_argument("--connected", help="comma-separated ISO codes of the connected regions (default: the 75 most populous besides Moscow)")
    p.add_argument("--shares", help="regional volume shares CODE=share,... summing to 1 (default: by population)")
    p.add_argument("--shares-file", type=Path, help="CSV iso_code,share (instead of --shares)")
    p.add_argument("--regional-per-quarter", type=float, default=3.2e6, help="studies per quarter from the connected regions (3.2 M)")
    p.add_argument("--moscow-per-month", type=float, default=2.0e6, help="Moscow's own studies per month (2 M)")
    p.add_argument("--no-moscow", action="store_true", help="plan the connected regions only")
    p.add_argument("--growth", type=float, default=1.0, help="volume factor, e.g. 1.3 for next year's growth")
    p.add_argument("--days", type=int, default=91, help="days simulated (a quarter: 91)")
    p.add_argument("--mix", help="modality shares NAME=share,... (default: the national mix in config.py)")
    p.add_argument("--weekend-factor", type=float, default=None, help="a weekend day's volume / a working day's")
    p.add_argument("--slo-p95-s", type=float, default=300.0, help="SLO: p95 time-to-result, seconds")
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="service-time profile (YAML/JSON; `mosmedai profile` writes one)")
    p.add_argument("--gpu", help="GPU type of the profile (default: its first)")
    p.add_argument("--designs", default=",".join(DESIGNS), help=f"comma-separated, from {DESIGNS}")
    p.add_argument("--min-replicas", type=int, default=1, help="GpuPool replicas.min of every pool")
    p.add_argument("--max-replicas", type=int, default=256, help="GpuPool replicas.max of every pool")
    p.add_argument("--tick-s", type=float, default=300.0, help="planner's decision interval, s (the operator's is 30 s)")
    p.add_argument("--spill-wait-fraction", type=float, default=0.25,
                   help="district_spill: a study spills to the neighbour pool when its wait would exceed this x the SLO")
    p.add_argument("--spill-delay-s", type=float, default=SpillOver.delay_s,
                   help="district_spill: network transfer of a spilled study to the neighbour district's pool, s "
                   "(default: the hop measured by tests/services/serving/test_network_hop.py)")
    p.add_argument("--neighbours", help="district_spill: override neighbours DISTRICT=NEIGHBOUR,... (default: the districts file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("capacity-report"), help="folder for report.html, report.md, results.json")
    p.add_argument("--no-report", action="store_true", help="print the tables only")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a terminal)")
    return p


def scenario_from_args(args) -> Scenario:
    regions = load_regions(args.regions, args.districts)
    connected = [c.strip() for c in args.connected.split(",") if c.strip()] if args.connected else None
    shares = parse_mapping(args.shares, "--shares") if args.shares else None
    if args.shares_file:
        import csv

        with open(args.shares_file, newline="") as handle:
            shares = {row["iso_code"]: float(row["share"]) for row in csv.DictReader(handle)}
    if shares is not None and connected is None:
        connected = sorted(shares)
    return make_scenario(
        regions=regions, connected=connected, shares=shares,
        mix_shares=parse_mapping(args.mix, "--mix") if args.mix else None,
        regional_studies_per_quarter=args.regional_per_quarter, moscow_studies_per_month=args.moscow_per_month,
        growth=args.growth, days=args.days, slo_p95_s=args.slo_p95_s, include_moscow=not args.no_moscow,
        weekend_factor=args.weekend_factor)


def print_tables(scenario: Scenario, profile: GpuProfile, results: list[DesignResult]) -> None:
    total = sum(p.studies for p in results[0].pools) if results else 0
    print(f"capacity plan: {total:,} studies over {scenario.days} days, growth x{scenario.growth}, "
          f"SLO p95 <= {scenario.slo_p95_s:.0f} s, profile {profile.name} ({profile.source or 'measured'})")
    print(f"{'design':28s} {'pools':>5s} {'GPUs':>5s} {'GPU-h':>9s} {'cost':>10s} {'p95 s':>8s} {'p99 s':>8s} {'<=SLO':>7s} {'sim s':>6s}")
    for r in results:
        print(f"{DESIGN_TITLES[r.design]:28s} {len(r.pools):5d} {r.gpus:5d} {r.gpu_hours:9.0f} {r.cost:10.0f} "
              f"{r.p95_s:8.2f} {r.p99_s:8.2f} {100 * r.within_slo:6.2f}% {r.seconds:6.1f}")
    headers, rows = spill_table(results)
    if rows:
        print("spill-over between district pools (p95 of each pool's own studies, wherever served):")
        print("  ".join(f"{h:>13s}" for h in headers))
        for row in rows:
            print("  ".join(f"{str(c):>13s}" for c in row))
    for r in results:
        for note in r.notes:
            print(f"{r.design}: {note}")
    failing = [(r.design, p.pool) for r in results for p in r.pools if not p.meets_slo]
    if failing:
        print(f"pools that miss the SLO even at the lowest utilisation target: {failing}")


def results_json(scenario: Scenario, profile: GpuProfile, results: list[DesignResult], timings: dict) -> dict:
    return {
        "scenario": {"days": scenario.days, "growth": scenario.growth, "slo_p95_s": scenario.slo_p95_s,
                     "regional_studies": scenario.regional_studies(), "moscow_studies": scenario.moscow_studies(),
                     "connected": scenario.connected, "mix": [asdict(m) for m in scenario.mix]},
        "profile": {"gpu": profile.name, "source": profile.source, "cost_per_gpu_hour": profile.cost_per_gpu_hour},
        "timings_s": timings,
        "designs": [{"design": r.design, "gpus": r.gpus, "gpu_hours": r.gpu_hours, "cost": r.cost, "p95_s": r.p95_s,
                     "p99_s": r.p99_s, "within_slo": r.within_slo, "seconds": r.seconds, "notes": r.notes,
                     "pools": [asdict(p) for p in r.pools]} for r in results],
    }


def _pairs(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise PlanningInputError(f"--neighbours: {part!r} is not DISTRICT=NEIGHBOUR")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scenario = scenario_from_args(args)
        profile = load_profile(args.profile, args.gpu)
        check_profile_covers(profile, scenario.mix, str(args.profile))
        designs = [d.strip() for d in args.designs.split(",") if d.strip()]
        for design in designs:
            pools_for(design, scenario)
        spill = None
        if "district_spill" in designs:
            neighbours = load_neighbours(args.districts, {k: str(v) for k, v in _pairs(args.neighbours).items()}
                                         if args.neighbours else None)
            spill = SpillOver(args.spill_wait_fraction, args.spill_delay_s, neighbours)
            if "district" not in designs:  # the comparison needs it
                designs.insert(designs.index("district_spill"), "district")
    except PlanningInputError as exc:
        print(f"mosmedai capacity: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = [run_design(d, scenario, profile, seed=args.seed, tick_s=args.tick_s, min_replicas=args.min_replicas,
                          max_replicas=args.max_replicas, progress=args.progress, spill=spill) for d in designs]
    timings = {"planner_total": time.perf_counter() - started} | {f"design_{r.design}": r.seconds for r in results}
    print_tables(scenario, profile, results)
    print(f"planner run: {timings['planner_total']:.1f} s")
    if not args.no_report:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results_json(scenario, profile, results, timings), indent=1))
        html, md = write_capacity_report(args.out, scenario, profile, results, timings)
        print(f"report: {html} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
