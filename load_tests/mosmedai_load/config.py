"""Inputs of the capacity planner, typed and checked in one place.

Every bad input fails with ``PlanningInputError`` and a message that names what is wrong
(unknown region codes, shares that do not sum to 1, negative volumes, a profile without the
tools the modality mix needs). Units are in the field names or the comments.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]
DATA_DIR = PACKAGE_DIR / "data"
#: CI runs with a copy of shared/ beside the clone; the planner's default regions file.
DEFAULT_REGIONS = REPO_ROOT.parent / "shared" / "data" / "regions.csv"
# The districts file is the platform's (the router maps pool-less regions by it too).
DEFAULT_DISTRICTS = REPO_ROOT / "services" / "mosmedai" / "data" / "federal_districts.csv"
DEFAULT_PROFILE = DATA_DIR / "profile_illustrative.yaml"
MOSCOW = "RU-MOW"


class PlanningInputError(ValueError):
    """A planner input is wrong; the message names the input and the offending values."""


@dataclass(frozen=True)
class Region:
    code: str  # ISO 3166-2
    name: str
    utc_offset_hours: int  # Russia keeps no summer time: a fixed offset is exact
    population_thousands: float
    district: str = ""

    @property
    def time_zone(self) -> str:
        """IANA name of the fixed offset (POSIX sign: Etc/GMT-3 is UTC+3)."""
        return "Etc/UTC" if self.utc_offset_hours == 0 else f"Etc/GMT{-self.utc_offset_hours:+d}"


def load_regions(path: Path | str = DEFAULT_REGIONS, districts: Path | str | None = DEFAULT_DISTRICTS) -> dict[str, Region]:
    path = Path(path)
    if not path.exists():
        raise PlanningInputError(f"regions file {path} does not exist (pass --regions PATH)")
    district_of: dict[str, str] = {}
    if districts is not None:
        with open(districts, newline="") as handle:
            for row in csv.DictReader(line for line in handle if not line.startswith("#")):
                district_of[row["iso_code"]] = row["district"]
    regions: dict[str, Region] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        needed = {"iso_code", "name", "utc_offset_hours", "population_thousands"}
        if not needed <= set(reader.fieldnames or ()):
            raise PlanningInputError(f"regions file {path} needs columns {sorted(needed)}, has {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                offset, population = int(row["utc_offset_hours"]), float(row["population_thousands"])
            except ValueError as exc:
                raise PlanningInputError(f"{path}:{line}: {exc}") from None
            if population < 0:
                raise PlanningInputError(f"{path}:{line}: population_thousands of {row['iso_code']} is negative ({population})")
            regions[row["iso_code"]] = Region(row["iso_code"], row["name"], offset, population,
                                              district_of.get(row["iso_code"], ""))
    return regions


def load_neighbours(districts: Path | str = DEFAULT_DISTRICTS, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """District -> the district its pool spills over to (the districts file's ``neighbour``
    column, then ``overrides``). A neighbour that is not a district of the file, a district
    naming itself, or two neighbours for one district fail with PlanningInputError."""
    path = Path(districts)
    if not path.exists():
        raise PlanningInputError(f"districts file {path} does not exist (pass --districts PATH)")
    neighbours: dict[str, str] = {}
    problems: list[str] = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(line for line in handle if not line.startswith("#"))
        if "neighbour" not in (reader.fieldnames or ()):
            raise PlanningInputError(f"districts file {path} has no neighbour column (has {reader.fieldnames})")
        for row in reader:
            district, neighbour = row["district"].strip(), (row["neighbour"] or "").strip()
            if neighbours.get(district, neighbour) != neighbour:
                problems.append(f"district {district} names two neighbours ({neighbours[district]}, {neighbour}) in {path}")
            if neighbour:
                neighbours[district] = neighbour
            else:
                neighbours.setdefault(district, "")
    known = set(neighbours)
    for district, neighbour in (overrides or {}).items():
        if district not in known:
            problems.append(f"--neighbours names {district!r}, which is not a district of {path} (known: {sorted(known)})")
        neighbours[district] = neighbour
    for district, neighbour in neighbours.items():
        if neighbour and neighbour not in known:
            problems.append(f"the neighbour of {district}, {neighbour!r}, is not a district (known: {sorted(known)})")
        if neighbour == district:
            problems.append(f"district {district} names itself as its neighbour")
    if problems:
        raise PlanningInputError("bad spill-over neighbours:\n  - " + "\n  - ".join(problems))
    return {d: n for d, n in neighbours.items() if n}


@dataclass(frozen=True)
class SpillOver:
    """Spill-over between district pools: a study whose wait at its own pool would exceed
    ``wait_fraction`` x the SLO goes to the neighbour's pool, ``delay_s`` later (the transfer)."""

    wait_fraction: float = 0.25  # of the SLO p95
    # Network transfer of a study to the neighbour district's pool. Measured by
    # tests/services/serving/test_network_hop.py: 0.3 ms for a transport-reduced chest X-ray over a
    # real veth hop, plus two round trips of the 20 ms inter-district link that its netem
    # delay emulates where the kernel has sch_netem: 0.04 s, rounded up.
    delay_s: float = 0.05
    neighbours: dict[str, str] = field(default_factory=dict)  # district -> neighbour district

    def __post_init__(self):
        problems = []
        if not math.isfinite(self.wait_fraction) or self.wait_fraction < 0:
            problems.append(f"spill-over wait threshold must be a non-negative fraction of the SLO, got {self.wait_fraction}")
        if not math.isfinite(self.delay_s) or self.delay_s < 0:
            problems.append(f"spill-over transfer delay must be non-negative seconds, got {self.delay_s}")
        if problems:
            raise PlanningInputError("bad spill-over settings:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Modality:
    """One kind of study: its share of studies, the tools it runs and items per tool."""

    name: str
    share: float  # of studies, 0..1; the mix sums to 1
    tools: dict[str, float]  # tool -> items per study (images; series for CT tools)
    overhead_ms: float = 0.0  # per study, off the GPU: upload, decode, gateway (adds to time-to-result)


#: Default national mix: ILLUSTRATIVE shares (no per-modality national split is published);
#: the tool counts per modality are DESIGN.md's (mammography 3, fluorography 3, chest X-ray 3,
#: CT brain 3, chest CT 5, spine 1). Only the cxr_* tools exist in the platform today; the
#: other names are the planned ensembles, for planning only. overhead_ms from DESIGN.md's
#: decode figures (RLE 2500x2048: 10 ms; JPEG 2000: 400 ms) plus transfer, rounded.
DEFAULT_MIX: tuple[Modality, ...] = (
    Modality("fluorography", 0.35, {"flg_opacity": 1, "flg_nodule": 1, "flg_tuberculosis": 1}, 60.0),
    Modality("chest_xray", 0.30, {"cxr_opacity": 1, "cxr_nodule": 1, "cxr_pneumothorax": 1}, 60.0),
    Modality("mammography", 0.15, {"mg_density": 4, "mg_mass": 4, "mg_calcification": 4}, 400.0),
    Modality("chest_ct", 0.12, {"ctc_nodule": 1, "ctc_covid": 1, "ctc_emphysema": 1,
                                "ctc_coronary_calcium": 1, "ctc_osteoporosis": 1}, 3000.0),
    Modality("brain_ct", 0.05, {"ctb_hemorrhage": 1, "ctb_ischemia": 1, "ctb_tumor": 1}, 2000.0),
    Modality("spine_xray", 0.03, {"spx_scoliosis": 1}, 60.0),
)

#: Studies per local hour on a working day, relative (normalised when used). ILLUSTRATIVE:
#: outpatient radiology from 08:00, peak late morning, a dip at lunch, tail into the evening,
#: emergency work overnight.
DEFAULT_WEEKDAY_CURVE: tuple[float, ...] = (
    0.6, 0.5, 0.4, 0.4, 0.4, 0.5, 1.0, 2.5, 6.0, 9.0, 10.0, 10.0,
    8.5, 8.0, 9.0, 8.5, 7.0, 5.0, 3.5, 2.5, 1.8, 1.3, 1.0, 0.8,
)
DEFAULT_WEEKEND_FACTOR = 0.35  # a weekend day's volume relative to a working day's


@dataclass(frozen=True)
class ToolProfile:
    batch: tuple[int, ...]
    ms: tuple[float, ...]  # one whole batch

    def per_item_ms(self, b: int) -> float:
        """Time per item when ``b`` items share a batch (interpolated per item, clamped)."""
        sizes = np.asarray(self.batch, float)
        per_item = np.asarray(self.ms, float) / sizes
        return float(np.interp(min(b, sizes[-1]), sizes, per_item))


@dataclass(frozen=True)
class GpuProfile:
    name: str
    tools: dict[str, ToolProfile]
    cost_per_gpu_hour: float
    service_cv: float = 0.0
    source: str = ""
    max_batch: int = 16
    overhead_ms: dict[str, float] = field(default_factory=dict)  # per modality; replaces the mix's figure

    def overhead_s(self, mix: tuple[Modality, ...]) -> np.ndarray:
        return np.array([self.overhead_ms.get(m.name, m.overhead_ms) / 1000 for m in mix])


def load_profile(path: Path | str, gpu: str | None = None) -> GpuProfile:
    path = Path(path)
    if not path.exists():
        raise PlanningInputError(f"profile {path} does not exist")
    raw = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    types = (raw or {}).get("gpu_types") or {}
    if not types:
        raise PlanningInputError(f"profile {path} has no gpu_types")
    if gpu is None:
        gpu = next(iter(types))
    if gpu not in types:
        raise PlanningInputError(f"profile {path} has no GPU type {gpu!r} (has {sorted(types)})")
    entry = types[gpu]
    tools: dict[str, ToolProfile] = {}
    for tool, spec in (entry.get("tools") or {}).items():
        batch, ms = tuple(int(b) for b in spec["batch"]), tuple(float(m) for m in spec["ms"])
        if len(batch) != len(ms) or not batch or list(batch) != sorted(set(batch)) or batch[0] < 1:
            raise PlanningInputError(f"profile {path}: {gpu}.tools.{tool}: batch must be increasing sizes >= 1, one ms per size")
        if any(m <= 0 or not math.isfinite(m) for m in ms):
            raise PlanningInputError(f"profile {path}: {gpu}.tools.{tool}: service times must be positive ms, got {ms}")
        tools[tool] = ToolProfile(batch, ms)
    cost = float(entry.get("cost_per_gpu_hour", 0.0))
    if cost < 0:
        raise PlanningInputError(f"profile {path}: {gpu}.cost_per_gpu_hour is negative ({cost})")
    max_batch = int(entry.get("max_batch", max((t.batch[-1] for t in tools.values()), default=1)))
    overhead = {str(k): float(v) for k, v in (entry.get("overhead_ms") or {}).items()}
    return GpuProfile(gpu, tools, cost, float(entry.get("service_cv", 0.0)), str(entry.get("source", "")), max_batch,
                      overhead)


@dataclass
class Scenario:
    """What the planner is asked. Defaults: DESIGN.md's public figures."""

    regions: dict[str, Region]
    connected: list[str]  # regional pools (Moscow separate)
    shares: dict[str, float]  # of the regional volume, sums to 1 over `connected`
    regional_studies_per_quarter: float = 3.2e6  # "about 3.2 M in the first quarter of 2026"
    moscow_studies_per_month: float = 2.0e6  # "2 M in January 2026 alone"
    growth: float = 1.0  # next year's volume / this year's
    days: int = 91  # a quarter: 13 weeks
    mix: tuple[Modality, ...] = DEFAULT_MIX
    weekday_curve: tuple[float, ...] = DEFAULT_WEEKDAY_CURVE
    weekend_factor: float = DEFAULT_WEEKEND_FACTOR
    slo_p95_s: float = 300.0  # p95 time-to-result, seconds ("initial analysis in just a few minutes")
    include_moscow: bool = True
    start_weekday: int = 0  # weekday of day 0 (0 = Monday)
    notes: list[str] = field(default_factory=list)

    def moscow_studies(self) -> float:
        return self.moscow_studies_per_month * 12 / 365 * self.days * self.growth if self.include_moscow else 0.0

    def regional_studies(self) -> float:
        return self.regional_studies_per_quarter * self.days / 91 * self.growth

    def region_totals(self) -> dict[str, float]:
        """Expected studies per pool region over the simulated days."""
        totals = {code: self.regional_studies() * self.shares[code] for code in self.connected}
        if self.include_moscow:
            totals[MOSCOW] = totals.get(MOSCOW, 0.0) + self.moscow_studies()
        return totals


def default_connected(regions: dict[str, Region], count: int = 75) -> list[str]:
    """Which 75 regions are connected is not published per region: by default the `count` most
    populous subjects other than Moscow (Moscow's own volume is counted separately)."""
    others = sorted((r for r in regions.values() if r.code != MOSCOW), key=lambda r: -r.population_thousands)
    return sorted(r.code for r in others[:count])


def parse_mapping(text: str, what: str) -> dict[str, float]:
    """``A=1,B=2`` -> {A: 1.0, B: 2.0}; a name given twice is an error."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise PlanningInputError(f"{what}: {part!r} is not NAME=VALUE")
        key, value = part.split("=", 1)
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise PlanningInputError(f"{what}: {value!r} of {key} is not a number") from None
    return out


def make_scenario(*, regions: dict[str, Region], connected: list[str] | None = None,
                  shares: dict[str, float] | None = None, mix_shares: dict[str, float] | None = None,
                  **kwargs) -> Scenario:
    """Build and check a scenario; every problem is reported at once in one message."""
    problems: list[str] = []
    if connected is None:
        connected = default_connected(regions)
    unknown = sorted(set(connected) - set(regions))
    if unknown:
        problems.append(f"unknown region codes {unknown} (not in the regions file; e.g. {sorted(regions)[:3]})")
    if len(set(connected)) != len(connected):
        problems.append("connected regions list a code more than once")
    known = [c for c in connected if c in regions]
    if shares is None:
        population = sum(regions[c].population_thousands for c in known)
        if known and population <= 0:
            problems.append("connected regions have no population to derive default shares from; give --shares")
        shares = {c: regions[c].population_thousands / population for c in known} if population > 0 else {}
    else:
        unknown_shares = sorted(set(shares) - set(regions))
        if unknown_shares:
            problems.append(f"shares name unknown region codes {unknown_shares}")
        not_connected = sorted(set(shares) & set(regions) - set(connected))
        if not_connected:
            problems.append(f"shares name regions that are not connected: {not_connected}")
        negative = {c: v for c, v in shares.items() if v < 0}
        if negative:
            problems.append(f"shares must not be negative: {negative}")
        missing = sorted(set(known) - set(shares))
        if missing:
            problems.append(f"shares miss connected regions {missing}")
        total = sum(shares.values())
        if abs(total - 1.0) > 1e-3:
            problems.append(f"shares sum to {total:.6f}, not 1 (over {len(shares)} regions)")
    for name in ("regional_studies_per_quarter", "moscow_studies_per_month", "growth", "slo_p95_s", "weekend_factor"):
        value = kwargs.get(name)
        if value is not None and (value < 0 or not math.isfinite(value)):
            problems.append(f"{name} must be a non-negative number, got {value}")
    if kwargs.get("slo_p95_s") == 0:
        problems.append("slo_p95_s must be positive")
    days = kwargs.get("days")
    if days is not None and days < 1:
        problems.append(f"days must be at least 1, got {days}")
    curve = kwargs.get("weekday_curve")
    if curve is not None and (len(curve) != 24 or min(curve) < 0 or sum(curve) <= 0):
        problems.append("weekday_curve needs 24 non-negative hourly weights with a positive sum")
    mix = list(kwargs.pop("mix", DEFAULT_MIX))
    if mix_shares is not None:
        by_name = {m.name: m for m in mix}
        unknown_mod = sorted(set(mix_shares) - set(by_name))
        if unknown_mod:
            problems.append(f"unknown modalities {unknown_mod} (known: {sorted(by_name)})")
        mix = [Modality(m.name, mix_shares[m.name], m.tools, m.overhead_ms) for m in mix if m.name in mix_shares]
    negative_mix = [m.name for m in mix if m.share < 0]
    if negative_mix:
        problems.append(f"modality shares must not be negative: {negative_mix}")
    mix = [m for m in mix if m.share > 0]
    mix_total = sum(m.share for m in mix)
    if not mix or abs(mix_total - 1.0) > 1e-3:
        problems.append(f"modality shares sum to {mix_total:.6f}, not 1")
    if problems:
        raise PlanningInputError("bad planner input:\n  - " + "\n  - ".join(problems))
    return Scenario(regions=regions, connected=list(connected), shares=dict(shares), mix=tuple(mix),
                    **{k: v for k, v in kwargs.items() if v is not None})


def check_profile_covers(profile: GpuProfile, mix: tuple[Modality, ...], path: str = "profile") -> None:
    needed = sorted({tool for m in mix for tool in m.tools})
    missing = [t for t in needed if t not in profile.tools]
    if missing:
        using = {t: [m.name for m in mix if t in m.tools] for t in missing}
        raise PlanningInputError(
            f"{path} ({profile.name}) has no service times for tools {missing}, needed by modalities "
            f"{sorted({n for names in using.values() for n in names})}; measure them with `mosmedai profile` "
            f"or restrict the mix (e.g. --mix chest_xray=1)")
