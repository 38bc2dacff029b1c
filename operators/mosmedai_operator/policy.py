"""The scaling policy of a GpuPool, as a pure function.

``decide(spec, current, samples, now)`` -> ``Decision(desired, reason, ...)``. No I/O,
no clock, no global state: the operator calls it on every timer tick, and the capacity
planner calls it to replay a day of load against a proposed spec.

How it decides (the README explains it for SREs):

1. A *recommendation* per metric sample, one per target that the spec sets, HPA-style
   (https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/#algorithm-details):

   - p95 queue time and GPU utilisation are per-replica signals:
     ``ceil(current * observed / target)``;
   - images per second is a pool total: ``ceil(observed / target_per_replica)``;
   - a signal within ``targets.tolerancePercent`` of its target recommends ``current``.

   The pool's recommendation is the largest of them (every target must hold).
2. Up fast: a newest recommendation above ``current`` is taken at once.
3. Down slowly: the pool shrinks only to the *largest* recommendation over the last
   ``scaleDown.stabilizationWindowSeconds`` (so one quiet minute after a busy one does
   not count) and by at most ``scaleDown.maxStep`` replicas per decision. Samples must
   cover the whole window without gaps, otherwise the size holds.
4. Missing data holds: no fresh sample for any target -> hold ``current``; some targets
   missing -> scale up on the others, never down.
5. Bounds last: never above ``replicas.max``; never below ``replicas.min`` nor, inside a
   schedule window of the region's local time (IANA zone, so Kaliningrad's UTC+2 and
   Kamchatka's UTC+12 each get their own morning), below the window's ``minReplicas``.
   A window's floor applies ``leadMinutes`` before its start so that the pods have
   loaded their models when the first images of the working day arrive.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone

from mosmedai_operator.spec import WEEKDAYS, GpuPoolSpec, ScheduleWindow

DEFAULT_MAX_SAMPLE_AGE = timedelta(minutes=2)


class Reason(enum.StrEnum):
    """Why the pool has the size it has. Values are Kubernetes-style CamelCase reasons."""

    QUEUE_TIME = "QueueTimeAboveTarget"  # scaled up: p95 queue time above target
    GPU_UTILIZATION = "GpuUtilizationAboveTarget"  # scaled up: GPUs busier than target
    THROUGHPUT = "ThroughputAboveTarget"  # scaled up: more images/s than replicas * target
    LOAD_BELOW_TARGETS = "LoadBelowTargets"  # scaled down: the whole window asked for fewer
    STABILIZING = "StabilizationWindow"  # wanted fewer, the window (or its coverage) holds
    WITHIN_TARGETS = "WithinTargets"  # metrics say the current size is right
    WITHIN_BOUNDS = "WithinBounds"  # no metrics were consulted (spec change); size within bounds
    SCHEDULE_FLOOR = "ScheduleFloor"  # raised to / held at a working-hours floor
    MIN_REPLICAS = "MinReplicas"  # raised to / held at replicas.min
    MAX_REPLICAS = "MaxReplicas"  # capped at replicas.max
    NO_METRICS = "NoMetrics"  # no fresh sample: hold
    PARTIAL_METRICS = "PartialMetrics"  # some targets have no data: up allowed, down not


class MetricsState(enum.StrEnum):
    COMPLETE = "Complete"
    PARTIAL = "Partial"
    MISSING = "Missing"


@dataclass(frozen=True)
class MetricSample:
    """One point in time of a pool's metrics. None = no data for that metric then."""

    time: datetime  # timezone-aware
    queue_time_p95_ms: float | None = None
    images_per_second: float | None = None  # whole pool
    gpu_utilization_percent: float | None = None  # average over the pool's GPUs, 0..100


@dataclass(frozen=True)
class Bounds:
    lower: int  # max(replicas.min, active floor), never above upper
    upper: int  # replicas.max
    floor: int  # the active schedule floor, 0 outside every window
    window: str | None  # name (or index) of the window that sets the floor

    @property
    def floor_binding(self) -> bool:
        """Does the schedule floor, rather than replicas.min, set ``lower``?"""
        return self.window is not None and self.floor >= self.lower


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: Reason
    message: str
    bounds: Bounds
    metrics: MetricsState
    recommendation: int | None = None  # metric-based recommendation before bounds
    latest: MetricSample | None = field(default=None, compare=False)


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _parse_hhmm(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


def window_active(window: ScheduleWindow, spec: GpuPoolSpec, now: datetime) -> bool:
    """Is ``now`` inside the window (including its lead time), in the region's local time?"""
    zone = spec.zone
    local = _aware(now).astimezone(zone)
    start, end = _parse_hhmm(window.start), _parse_hhmm(window.end)
    lead = timedelta(minutes=window.lead_minutes)
    # A window belongs to the day it starts on; with the lead time and overnight windows
    # it can reach into the previous or the next day, so look at three days.
    for offset in (-1, 0, 1):
        day: date = local.date() + timedelta(days=offset)
        if WEEKDAYS[day.weekday()] not in window.days:
            continue
        begins = datetime.combine(day, start, tzinfo=zone) - lead
        ends_day = day if end > start else day + timedelta(days=1)
        ends = datetime.combine(ends_day, end, tzinfo=zone)
        # Compare in UTC: aware datetimes with the same tzinfo compare by wall time.
        if begins.astimezone(timezone.utc) <= now.astimezone(timezone.utc) < ends.astimezone(timezone.utc):
            return True
    return False


def bounds(spec: GpuPoolSpec, now: datetime) -> Bounds:
    """The replica range in force at ``now``: min/max and the working-hours floor."""
    floor, name = 0, None
    for i, window in enumerate(spec.schedule):
        if window.min_replicas > floor and window_active(window, spec, now):
            floor, name = window.min_replicas, window.name or f"schedule[{i}]"
    upper = spec.replicas.max
    lower = min(max(spec.replicas.min, floor), upper)
    # The window is named only where its floor is above replicas.min, i.e. where it matters.
    return Bounds(lower=lower, upper=upper, floor=floor, window=name if floor > spec.replicas.min else None)


def _ceil(value: float) -> int:
    # Round first so that 3.0000000000004 (float noise) does not become 4.
    return math.ceil(round(value, 6))


def recommend(spec: GpuPoolSpec, current: int, sample: MetricSample) -> tuple[int | None, Reason | None, list[str]]:
    """Replicas that one sample asks for: (recommendation, the metric that set it, missing metrics).

    The recommendation is None when no configured target has data in the sample.
    """
    targets = spec.targets
    tolerance = targets.tolerance_percent / 100
    wanted: list[tuple[int, Reason]] = []
    missing: list[str] = []

    def ratio_rule(observed: float | None, target: float | None, reason: Reason, name: str) -> None:
        if target is None:
            return
        if observed is None or current == 0:  # no pods, no per-replica signal
            missing.append(name)
            return
        ratio = observed / target
        wanted.append((current if abs(ratio - 1) <= tolerance else _ceil(current * ratio), reason))

    ratio_rule(sample.queue_time_p95_ms, targets.queue_time_p95_ms, Reason.QUEUE_TIME, "queueTimeP95Ms")
    ratio_rule(sample.gpu_utilization_percent, targets.gpu_utilization_percent, Reason.GPU_UTILIZATION, "gpuUtilizationPercent")
    per_replica = targets.images_per_second_per_replica
    if per_replica is not None:
        observed = sample.images_per_second
        if observed is None:
            missing.append("imagesPerSecondPerReplica")
        elif current > 0 and abs(observed / (current * per_replica) - 1) <= tolerance:
            wanted.append((current, Reason.THROUGHPUT))
        else:
            wanted.append((_ceil(observed / per_replica), Reason.THROUGHPUT))
    if not wanted:
        return None, None, missing
    replicas, reason = max(wanted, key=lambda item: item[0])  # first of equals: queue > GPU > throughput
    return replicas, reason, missing


def _clamp(desired: int, reason: Reason, b: Bounds) -> tuple[int, Reason]:
    if desired > b.upper:
        return b.upper, Reason.MAX_REPLICAS
    if desired < b.lower:
        return b.lower, (Reason.SCHEDULE_FLOOR if b.floor_binding else Reason.MIN_REPLICAS)
    return desired, reason


def _decision(desired: int, reason: Reason, message: str, b: Bounds, state: MetricsState,
              recommendation: int | None, latest: MetricSample | None) -> Decision:
    clamped, final_reason = _clamp(desired, reason, b)
    if final_reason is not reason:
        message = f"{message}; bounded to {clamped} ({final_reason}: range {b.lower}..{b.upper}" + (
            f", floor {b.floor} from {b.window})" if b.window else ")")
    return Decision(clamped, final_reason, message, b, state, recommendation, latest)


def clamp(spec: GpuPoolSpec, current: int, now: datetime) -> Decision:
    """Bounds only, no metrics: for a spec change between two timer ticks."""
    b = bounds(spec, now)
    return _decision(current, Reason.WITHIN_BOUNDS, f"kept {current} replicas", b, MetricsState.MISSING, None, None)


def _window_covered(window_samples: Sequence[MetricSample], since: datetime, now: datetime, max_gap: timedelta) -> bool:
    if not window_samples:
        return False
    times = [s.time for s in window_samples]
    if times[0] - since > max_gap or now - times[-1] > max_gap:
        return False
    return all(b - a <= max_gap for a, b in zip(times, times[1:]))


def decide(
    spec: GpuPoolSpec,
    current: int,
    samples: Sequence[MetricSample],
    now: datetime,
    *,
    max_sample_age: timedelta = DEFAULT_MAX_SAMPLE_AGE,
) -> Decision:
    """Desired replicas for a pool of ``current`` replicas given its metric ``samples``.

    ``samples`` should span the stabilisation window up to ``now`` (any order; samples
    after ``now`` are ignored). ``max_sample_age``: the newest sample must be this fresh,
    and the window may have no gap longer than this.
    """
    now = _aware(now)
    b = bounds(spec, now)
    ordered = sorted((s for s in samples if s.time <= now), key=lambda s: s.time)
    latest = ordered[-1] if ordered else None
    if latest is None or now - latest.time > max_sample_age:
        age = "no samples" if latest is None else f"newest sample {(now - latest.time).total_seconds():.0f}s old"
        return _decision(current, Reason.NO_METRICS, f"held {current} replicas: {age}", b, MetricsState.MISSING, None, latest)

    rec, why, missing = recommend(spec, current, latest)
    if rec is None:
        return _decision(current, Reason.NO_METRICS, f"held {current} replicas: no data for {', '.join(missing)}",
                         b, MetricsState.MISSING, None, latest)
    if missing:
        if rec > current:
            return _decision(rec, why or Reason.PARTIAL_METRICS, f"scaled up {current}->{rec} on partial metrics (no data for {', '.join(missing)})",
                             b, MetricsState.PARTIAL, rec, latest)
        return _decision(current, Reason.PARTIAL_METRICS, f"held {current} replicas: no data for {', '.join(missing)}; not scaling down",
                         b, MetricsState.PARTIAL, rec, latest)
    if rec > current:
        return _decision(rec, why or Reason.WITHIN_TARGETS, f"scaled up {current}->{rec}", b, MetricsState.COMPLETE, rec, latest)
    if rec == current:
        return _decision(current, Reason.WITHIN_TARGETS, f"kept {current} replicas", b, MetricsState.COMPLETE, rec, latest)

    # Down: the largest recommendation over the stabilisation window, by at most maxStep.
    window = timedelta(seconds=spec.scale_down.stabilization_window_seconds)
    stable = rec
    if window > timedelta(0):
        since = now - window
        in_window = [s for s in ordered if s.time >= since]
        recs = [recommend(spec, current, s) for s in in_window]
        complete = [s for s, (r, _, miss) in zip(in_window, recs) if r is not None and not miss]
        if not _window_covered(complete, since, now, max_sample_age):
            return _decision(current, Reason.STABILIZING,
                             f"held {current} replicas (wanted {rec}): metrics do not cover the {window.total_seconds():.0f}s window yet",
                             b, MetricsState.COMPLETE, rec, latest)
        stable = max(r for r, _, miss in recs if r is not None and not miss)
        if stable >= current:
            return _decision(current, Reason.STABILIZING,
                             f"held {current} replicas (wanted {rec}): the last {window.total_seconds():.0f}s asked for {stable}",
                             b, MetricsState.COMPLETE, rec, latest)
    desired = max(stable, current - spec.scale_down.max_step)
    return _decision(desired, Reason.LOAD_BELOW_TARGETS, f"scaled down {current}->{desired} (wanted {rec})",
                     b, MetricsState.COMPLETE, rec, latest)
