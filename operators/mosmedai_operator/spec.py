"""Typed GpuPool spec (mosmedai.io/v1alpha1) and the checks the CRD schema cannot make.

Defaults and bounds here equal those in ``operators/crds/gpupools.mosmedai.io.yaml``
(a test compares them): the API server applies the schema's defaults, this model
applies the same ones to objects that did not pass through an API server (the
capacity planner, the API emulator in tests).
"""
from __future__ import annotations

import zoneinfo
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

WEEKDAYS: tuple[str, ...] = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # index = datetime.weekday()
Weekday = Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]

# ISO 3166-2: two-letter country code, hyphen, up to three alphanumerics (RU-MOW, RU-KAM).
REGION_PATTERN = r"^[A-Z]{2}-[A-Z0-9]{1,3}$"
# IANA tz database key syntax (Area/Location[/Sub]); whether it exists is checked with zoneinfo.
TIME_ZONE_PATTERN = r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+){0,2}$"
HHMM_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"
TOOL_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"  # a Triton model folder name, as our ensembles are named
# Extended resource name: a domain-prefixed name, e.g. nvidia.com/gpu, amd.com/gpu.
RESOURCE_NAME_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z]{2,}/[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"
DURATION_PATTERN = r"^[0-9]+(ms|s|m)$"  # Prometheus duration as prometheus-operator accepts it
# A model repository as Triton's --model-repository reads it: s3://bucket[/prefix], with an
# optional custom endpoint (s3://host:port/bucket/prefix, s3://https://host:port/...),
# gs://bucket[/prefix], as://account/container[/prefix], or an absolute path in the container.
MODEL_REPOSITORY_PATTERN = (
    r"^((s3://(https://)?[A-Za-z0-9][A-Za-z0-9.\-]*(:[0-9]{1,5})?|gs://[a-z0-9][a-z0-9._\-]*|as://[a-z0-9]+)"
    r"(/[A-Za-z0-9._+=\-]+)*/?|(/[A-Za-z0-9._+=\-]+)+/?)$"
)
MAX_REPLICAS = 256
POOL_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # a GpuPool's name (DNS-1123 label), as neighbours name it
# Federal district codes (services/mosmedai/data/federal_districts.csv): CFD Central, NWF
# North-Western, SFD Southern, NCF North Caucasian, VFD Volga, UFD Ural, SIB Siberian, FEF Far Eastern.
District = Literal["CFD", "NWF", "SFD", "NCF", "VFD", "UFD", "SIB", "FEF"]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class GpuSpec(_Model):
    resource_name: str = Field(default="nvidia.com/gpu", pattern=RESOURCE_NAME_PATTERN)
    count: int = Field(default=1, ge=0, le=16)  # GPUs per replica; 0 = a CPU-only pool (development)
    product: str | None = Field(default=None, min_length=1, max_length=63)


class ReplicaBounds(_Model):
    min: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    max: int = Field(default=4, ge=1, le=MAX_REPLICAS)


class Targets(_Model):
    queue_time_p95_ms: float | None = Field(default=None, ge=1, le=600_000)
    gpu_utilization_percent: float | None = Field(default=None, ge=1, le=100)
    images_per_second_per_replica: float | None = Field(default=None, ge=0.01, le=100_000)
    tolerance_percent: float = Field(default=10, ge=0, le=50)  # no change while within +-10 % of a target


class ScheduleWindow(_Model):
    name: str | None = Field(default=None, max_length=63)
    days: list[Weekday] = Field(default_factory=lambda: ["Mon", "Tue", "Wed", "Thu", "Fri"], min_length=1, max_length=7)
    start: str = Field(pattern=HHMM_PATTERN)  # region-local wall time
    end: str = Field(pattern=HHMM_PATTERN)  # region-local; end < start = the window crosses midnight
    min_replicas: int = Field(ge=0, le=MAX_REPLICAS)
    lead_minutes: int = Field(default=15, ge=0, le=240)  # floor starts this early: pods must load models first


class ScaleDown(_Model):
    stabilization_window_seconds: int = Field(default=600, ge=0, le=7200)
    max_step: int = Field(default=1, ge=1, le=MAX_REPLICAS)


class ServiceMonitorSpec(_Model):
    enabled: bool = False
    interval: str = Field(default="15s", pattern=DURATION_PATTERN)


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class GpuPoolSpec(_Model):
    region: str = Field(pattern=REGION_PATTERN)
    time_zone: str = Field(pattern=TIME_ZONE_PATTERN)
    gpu: GpuSpec = Field(default_factory=GpuSpec)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None  # core/v1 Affinity, passed through as is
    tools: list[str] = Field(min_length=1, max_length=32)
    replicas: ReplicaBounds = Field(default_factory=ReplicaBounds)
    targets: Targets
    schedule: list[ScheduleWindow] = Field(default_factory=list, max_length=16)
    scale_down: ScaleDown = Field(default_factory=ScaleDown)
    service_monitor: ServiceMonitorSpec = Field(default_factory=ServiceMonitorSpec)
    model_load_timeout_seconds: int = Field(default=900, ge=60, le=7200)
    # Triton's --model-repository for this pool; None = the operator's triton_model_repository.
    model_repository: str | None = Field(default=None, pattern=MODEL_REPOSITORY_PATTERN, max_length=1024)
    # Read by the router's pool discovery (services/mosmedai/serving/pool_discovery.py), not acted on
    # here: the districts whose regions without a pool come here, the pools to spill or fail
    # over to (nearest first), and the one-way transfer time to this pool (s). A routing
    # mistake (a neighbour that is the pool itself or no GpuPool) is the router's to skip,
    # not a reason to stop scaling the pool's Triton.
    districts: list[District] = Field(default_factory=list, max_length=8)
    neighbours: list[Annotated[str, Field(pattern=POOL_NAME_PATTERN, max_length=63)]] = Field(
        default_factory=list, max_length=16)
    transfer_seconds: float = Field(default=0, ge=0, le=600)

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.time_zone)


def _location(loc: Iterable[Any]) -> str:
    path = "spec"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def parse_spec(raw: Mapping[str, Any] | None) -> tuple[GpuPoolSpec | None, list[str]]:
    """Parse a GpuPool's ``spec`` into the typed model; on failure, one message per error."""
    try:
        return GpuPoolSpec.model_validate(dict(raw or {})), []
    except ValidationError as exc:
        return None, [f"{_location(err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)]


def semantic_problems(spec: GpuPoolSpec, known_tools: Iterable[str] | None) -> list[str]:
    """What passes the schema but makes no sense. Empty list = the spec may be acted on.

    ``known_tools``: the ensembles of the model repository; None skips that check
    (the capacity planner has no repository at hand).
    """
    problems: list[str] = []
    if spec.replicas.min > spec.replicas.max:
        problems.append(f"spec.replicas.min ({spec.replicas.min}) is greater than spec.replicas.max ({spec.replicas.max})")
    try:
        zoneinfo.ZoneInfo(spec.time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problems.append(f"spec.timeZone {spec.time_zone!r} is not an IANA time zone known to this operator")
    if len(set(spec.tools)) != len(spec.tools):
        problems.append("spec.tools lists a tool more than once")
    if known_tools is not None:
        known = set(known_tools)
        unknown = sorted(set(spec.tools) - known)
        if unknown:
            problems.append(
                f"spec.tools {unknown} are not ensembles of the model repository "
                f"(known: {sorted(known) or 'none'})"
            )
    targets = spec.targets
    if targets.queue_time_p95_ms is None and targets.gpu_utilization_percent is None and targets.images_per_second_per_replica is None:
        problems.append("spec.targets sets no target (queueTimeP95Ms, gpuUtilizationPercent or imagesPerSecondPerReplica)")
    for i, window in enumerate(spec.schedule):
        if window.start == window.end:
            problems.append(f"spec.schedule[{i}] starts and ends at {window.start}: an empty window")
        if window.min_replicas > spec.replicas.max:
            problems.append(f"spec.schedule[{i}].minReplicas ({window.min_replicas}) is greater than spec.replicas.max ({spec.replicas.max})")
    if len(set(spec.districts)) != len(spec.districts):
        problems.append("spec.districts lists a district more than once")
    if len(set(spec.neighbours)) != len(spec.neighbours):
        problems.append("spec.neighbours lists a pool more than once")
    if spec.gpu.product is not None and spec.gpu.count == 0:
        problems.append("spec.gpu.product is set but spec.gpu.count is 0: a CPU pool cannot pick a GPU model")
    return problems


def validate(raw: Mapping[str, Any] | None, known_tools: Iterable[str] | None) -> tuple[GpuPoolSpec | None, list[str]]:
    """Parse and check a raw spec: (the spec, []) when it may be acted on, else (None, problems)."""
    spec, problems = parse_spec(raw)
    if spec is None:
        return None, problems
    problems = semantic_problems(spec, known_tools)
    return (spec if not problems else None), problems
