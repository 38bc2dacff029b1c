"""Table tests of the pure scaling policy (mosmedai_operator.policy)."""
from __future__ import annotations

import zoneinfo
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from mosmedai_operator.policy import Decision, MetricSample, MetricsState, Reason, bounds, clamp, decide, window_active
from mosmedai_operator.spec import GpuPoolSpec

UTC = timezone.utc
# Monday 2 March 2026, 12:00 UTC: 15:00 in Moscow, 14:00 in Kaliningrad, 00:00 (Tuesday) in Kamchatka.
MONDAY_NOON = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
STEP = timedelta(seconds=30)


def make_spec(**overrides: Any) -> GpuPoolSpec:
    raw: dict[str, Any] = {
        "region": "RU-MOW",
        "timeZone": "Europe/Moscow",
        "tools": ["cxr_opacity"],
        "replicas": {"min": 1, "max": 10},
        "targets": {"queueTimeP95Ms": 200},
        "scaleDown": {"stabilizationWindowSeconds": 300, "maxStep": 1},
    }
    raw.update(overrides)
    return GpuPoolSpec.model_validate(raw)


def series(now: datetime, window: timedelta = timedelta(seconds=300), step: timedelta = STEP, **values: Any) -> list[MetricSample]:
    """Constant samples every ``step`` from ``now - window - step`` to ``now``."""
    count = int((window + step) / step) + 1
    return [MetricSample(time=now - window - step + i * step, **values) for i in range(count)]


# --- each target alone and combined ------------------------------------------------------

TARGET_CASES = [
    # id, targets, current, sample values, expected replicas, expected reason
    ("queue-up", {"queueTimeP95Ms": 200}, 2, {"queue_time_p95_ms": 400}, 4, Reason.QUEUE_TIME),
    ("queue-within-tolerance", {"queueTimeP95Ms": 200}, 2, {"queue_time_p95_ms": 215}, 2, Reason.WITHIN_TARGETS),
    ("queue-tolerance-0", {"queueTimeP95Ms": 200, "tolerancePercent": 0}, 2, {"queue_time_p95_ms": 215}, 3, Reason.QUEUE_TIME),
    ("gpu-up", {"gpuUtilizationPercent": 60}, 3, {"gpu_utilization_percent": 90}, 5, Reason.GPU_UTILIZATION),
    ("gpu-exact", {"gpuUtilizationPercent": 60}, 3, {"gpu_utilization_percent": 60}, 3, Reason.WITHIN_TARGETS),
    ("throughput-up", {"imagesPerSecondPerReplica": 30}, 1, {"images_per_second": 100}, 4, Reason.THROUGHPUT),
    ("throughput-exact-multiple", {"imagesPerSecondPerReplica": 25}, 2, {"images_per_second": 100}, 4, Reason.THROUGHPUT),
    ("throughput-from-zero", {"imagesPerSecondPerReplica": 25}, 0, {"images_per_second": 60}, 3, Reason.THROUGHPUT),
    ("combined-throughput-wins", {"queueTimeP95Ms": 200, "gpuUtilizationPercent": 60, "imagesPerSecondPerReplica": 10},
     2, {"queue_time_p95_ms": 300, "gpu_utilization_percent": 70, "images_per_second": 75}, 8, Reason.THROUGHPUT),
    ("combined-queue-wins", {"queueTimeP95Ms": 100, "gpuUtilizationPercent": 60, "imagesPerSecondPerReplica": 10},
     2, {"queue_time_p95_ms": 450, "gpu_utilization_percent": 70, "images_per_second": 20}, 9, Reason.QUEUE_TIME),
    ("combined-gpu-wins", {"queueTimeP95Ms": 100, "gpuUtilizationPercent": 50}, 4,
     {"queue_time_p95_ms": 100, "gpu_utilization_percent": 95}, 8, Reason.GPU_UTILIZATION),
    ("combined-one-target-holds-the-size", {"queueTimeP95Ms": 100, "gpuUtilizationPercent": 50}, 4,
     {"queue_time_p95_ms": 10, "gpu_utilization_percent": 50}, 4, Reason.WITHIN_TARGETS),
]


@pytest.mark.parametrize("targets,current,values,expected,reason", [c[1:] for c in TARGET_CASES], ids=[c[0] for c in TARGET_CASES])
def test_targets_alone_and_combined(targets: dict, current: int, values: dict, expected: int, reason: Reason) -> None:
    spec = make_spec(targets=targets, replicas={"min": 0, "max": 10})
    decision = decide(spec, current, series(MONDAY_NOON, **values), MONDAY_NOON)
    assert (decision.desired, decision.reason) == (expected, reason), decision.message
    assert decision.metrics is MetricsState.COMPLETE


# --- bounds --------------------------------------------------------------------------------

BOUND_CASES = [
    ("capped-at-max", {"min": 1, "max": 3}, 2, {"queue_time_p95_ms": 2000}, 3, Reason.MAX_REPLICAS),
    ("current-above-max-comes-down-at-once", {"min": 1, "max": 3}, 7, {"queue_time_p95_ms": 200}, 3, Reason.MAX_REPLICAS),
    ("raised-to-min", {"min": 2, "max": 5}, 1, {"queue_time_p95_ms": 200}, 2, Reason.MIN_REPLICAS),
    ("idle-goes-down-to-min-by-step", {"min": 2, "max": 5}, 5, {"queue_time_p95_ms": 1}, 4, Reason.LOAD_BELOW_TARGETS),
    ("idle-at-min-stays", {"min": 2, "max": 5}, 2, {"queue_time_p95_ms": 1}, 2, Reason.MIN_REPLICAS),
    ("zero-min-allows-zero", {"min": 0, "max": 5}, 1, {"queue_time_p95_ms": 0}, 0, Reason.LOAD_BELOW_TARGETS),
]


@pytest.mark.parametrize("replicas,current,values,expected,reason", [c[1:] for c in BOUND_CASES], ids=[c[0] for c in BOUND_CASES])
def test_min_max_bounds(replicas: dict, current: int, values: dict, expected: int, reason: Reason) -> None:
    spec = make_spec(replicas=replicas)
    decision = decide(spec, current, series(MONDAY_NOON, **values), MONDAY_NOON)
    assert (decision.desired, decision.reason) == (expected, reason), decision.message


def test_max_step_limits_scale_down_but_not_scale_up() -> None:
    spec = make_spec(scaleDown={"stabilizationWindowSeconds": 300, "maxStep": 3}, replicas={"min": 1, "max": 20})
    down = decide(spec, 10, series(MONDAY_NOON, queue_time_p95_ms=1), MONDAY_NOON)
    assert (down.desired, down.reason) == (7, Reason.LOAD_BELOW_TARGETS)
    up = decide(spec, 2, series(MONDAY_NOON, queue_time_p95_ms=2000), MONDAY_NOON)
    assert (up.desired, up.reason) == (20, Reason.QUEUE_TIME)  # 2 * 2000/200 = 20: up in one step


def test_scale_down_without_window_is_immediate_but_stepped() -> None:
    spec = make_spec(scaleDown={"stabilizationWindowSeconds": 0, "maxStep": 2})
    samples = [MetricSample(MONDAY_NOON, queue_time_p95_ms=1)]
    assert decide(spec, 6, samples, MONDAY_NOON).desired == 4


# --- stabilisation and flapping ----------------------------------------------------------------

def test_one_busy_sample_in_the_window_holds_the_size() -> None:
    spec = make_spec()
    samples = series(MONDAY_NOON, queue_time_p95_ms=20)
    samples[3] = MetricSample(samples[3].time, queue_time_p95_ms=390)  # 2 * 390/200 -> 4
    decision = decide(spec, 4, samples, MONDAY_NOON)
    assert (decision.desired, decision.reason) == (4, Reason.STABILIZING)
    # Once that sample has left the window, the pool may shrink (one step).
    later = MONDAY_NOON + timedelta(seconds=300)
    decision = decide(spec, 4, series(later, queue_time_p95_ms=20) + samples, later)
    assert (decision.desired, decision.reason) == (3, Reason.LOAD_BELOW_TARGETS)


def test_flapping_input_scales_up_once_and_does_not_oscillate() -> None:
    spec = make_spec(scaleDown={"stabilizationWindowSeconds": 300, "maxStep": 1})
    history: list[MetricSample] = []
    current, sizes = 2, []
    now = MONDAY_NOON
    for tick in range(40):  # 20 minutes of a queue alternating 400 ms / 20 ms every 30 s
        history.append(MetricSample(now, queue_time_p95_ms=400 if tick % 2 == 0 else 20))
        decision = decide(spec, current, history[-12:], now)
        current = decision.desired
        sizes.append(current)
        now += STEP
    changes = sum(1 for a, b in zip(sizes, sizes[1:]) if a != b)
    assert sizes[0] == 4 and min(sizes) >= 4, sizes  # never down while a busy sample is in the window
    assert changes <= 3, sizes  # the ratio rule may step up again, but never flips back and forth
    assert all(b >= a for a, b in zip(sizes, sizes[1:])), sizes


def test_sustained_low_load_drains_step_by_step_after_the_window() -> None:
    spec = make_spec(replicas={"min": 1, "max": 10}, scaleDown={"stabilizationWindowSeconds": 120, "maxStep": 1})
    now, current, history = MONDAY_NOON, 6, []
    sizes = []
    for _ in range(20):
        history.append(MetricSample(now, queue_time_p95_ms=5))
        current = decide(spec, current, history, now, max_sample_age=timedelta(seconds=30)).desired
        sizes.append(current)
        now += STEP
    assert sizes[:3] == [6, 6, 6]  # the 120 s window is not yet covered by samples
    assert sizes[-1] == 1 and all(a - b in (0, 1) for a, b in zip(sizes, sizes[1:])), sizes


# --- Prometheus gaps ------------------------------------------------------------------------

def test_no_samples_holds_the_current_size() -> None:
    decision = decide(make_spec(), 3, [], MONDAY_NOON)
    assert (decision.desired, decision.reason, decision.metrics) == (3, Reason.NO_METRICS, MetricsState.MISSING)


def test_stale_samples_count_as_none() -> None:
    old = series(MONDAY_NOON - timedelta(minutes=10), queue_time_p95_ms=900)
    decision = decide(make_spec(), 3, old, MONDAY_NOON, max_sample_age=timedelta(minutes=2))
    assert (decision.desired, decision.reason) == (3, Reason.NO_METRICS)


def test_future_samples_are_ignored() -> None:
    future = [MetricSample(MONDAY_NOON + timedelta(minutes=1), queue_time_p95_ms=900)]
    assert decide(make_spec(), 3, future, MONDAY_NOON).reason is Reason.NO_METRICS


def test_metric_without_data_in_newest_sample_holds() -> None:
    samples = series(MONDAY_NOON, queue_time_p95_ms=None, gpu_utilization_percent=99)  # queue: NaN/absent
    decision = decide(make_spec(), 3, samples, MONDAY_NOON)
    assert (decision.desired, decision.reason) == (3, Reason.NO_METRICS)
    assert "queueTimeP95Ms" in decision.message


def test_partial_metrics_scale_up_but_never_down() -> None:
    spec = make_spec(targets={"queueTimeP95Ms": 200, "gpuUtilizationPercent": 50})
    up = decide(spec, 2, series(MONDAY_NOON, gpu_utilization_percent=100), MONDAY_NOON)
    assert (up.desired, up.reason, up.metrics) == (4, Reason.GPU_UTILIZATION, MetricsState.PARTIAL)
    hold = decide(spec, 4, series(MONDAY_NOON, gpu_utilization_percent=5), MONDAY_NOON)
    assert (hold.desired, hold.reason, hold.metrics) == (4, Reason.PARTIAL_METRICS, MetricsState.PARTIAL)


def test_a_gap_inside_the_window_blocks_scale_down() -> None:
    samples = [s for s in series(MONDAY_NOON, queue_time_p95_ms=5)
               if not (MONDAY_NOON - timedelta(seconds=240) < s.time < MONDAY_NOON - timedelta(seconds=60))]
    decision = decide(make_spec(), 5, samples, MONDAY_NOON, max_sample_age=timedelta(seconds=60))
    assert (decision.desired, decision.reason) == (5, Reason.STABILIZING)
    assert "cover" in decision.message


def test_window_not_yet_covered_after_start_blocks_scale_down() -> None:
    recent = [MetricSample(MONDAY_NOON - timedelta(seconds=s), queue_time_p95_ms=5) for s in (60, 30, 0)]
    assert decide(make_spec(), 5, recent, MONDAY_NOON).reason is Reason.STABILIZING


def test_gap_does_not_block_scale_up() -> None:
    samples = [MetricSample(MONDAY_NOON - timedelta(seconds=600), queue_time_p95_ms=5),
               MetricSample(MONDAY_NOON, queue_time_p95_ms=800)]
    assert decide(make_spec(), 2, samples, MONDAY_NOON).desired == 8


# --- time zones and working-hour floors -----------------------------------------------------

WORKING_DAY = [{"name": "working-day", "start": "07:30", "end": "20:00", "minReplicas": 5, "leadMinutes": 15}]
# IANA zones of Russia, UTC+2 .. UTC+12, none with daylight saving time.
ZONES = {
    2: "Europe/Kaliningrad", 3: "Europe/Moscow", 4: "Europe/Samara", 5: "Asia/Yekaterinburg",
    6: "Asia/Omsk", 7: "Asia/Novosibirsk", 8: "Asia/Irkutsk", 9: "Asia/Yakutsk",
    10: "Asia/Vladivostok", 11: "Asia/Magadan", 12: "Asia/Kamchatka",
}


@pytest.mark.parametrize("offset,zone", sorted(ZONES.items()))
def test_zones_have_fixed_offsets_all_year(offset: int, zone: str) -> None:
    tz = zoneinfo.ZoneInfo(zone)
    for month in range(1, 13):
        assert datetime(2026, month, 15, 12, tzinfo=tz).utcoffset() == timedelta(hours=offset)


# (UTC instant, offsets whose working-day floor (07:15 with lead .. 20:00, Mon-Fri) is active)
FLOOR_CASES = [
    # Monday 04:00 UTC: 06:00 in Kaliningrad, 07:00 in Moscow (lead starts 07:15), 16:00 in Kamchatka.
    (datetime(2026, 3, 2, 4, 0, tzinfo=UTC), {4, 5, 6, 7, 8, 9, 10, 11, 12}),
    # Monday 04:15 UTC: Moscow reaches 07:15, the start of its lead time.
    (datetime(2026, 3, 2, 4, 15, tzinfo=UTC), {3, 4, 5, 6, 7, 8, 9, 10, 11, 12}),
    # Monday 16:00 UTC: Kaliningrad 18:00 and Moscow 19:00 still working; Samara's 20:00 is the end.
    (datetime(2026, 3, 2, 16, 0, tzinfo=UTC), {2, 3}),
    # Sunday 21:00 UTC: Monday 09:00 in Kamchatka, 08:00 in Magadan, 07:00 in Vladivostok (not yet).
    (datetime(2026, 3, 1, 21, 0, tzinfo=UTC), {11, 12}),
    # Friday 20:00 UTC: Saturday 08:00 in Kamchatka: no working-day floor anywhere.
    (datetime(2026, 3, 6, 20, 0, tzinfo=UTC), set()),
    # Monday 00:00 UTC: 12:00 in Kamchatka down to 07:00 in Omsk (UTC+6 -> 06:00, not yet).
    (datetime(2026, 3, 2, 0, 0, tzinfo=UTC), {8, 9, 10, 11, 12}),
]


@pytest.mark.parametrize("now,active", FLOOR_CASES, ids=[c[0].strftime("%a-%H%MZ") for c in FLOOR_CASES])
def test_working_hour_floor_per_zone(now: datetime, active: set[int]) -> None:
    for offset, zone in ZONES.items():
        spec = make_spec(timeZone=zone, schedule=WORKING_DAY, replicas={"min": 1, "max": 10})
        b = bounds(spec, now)
        assert (b.lower == 5) == (offset in active), f"UTC+{offset} {zone} at {now.isoformat()}: {b}"
        # Without any metrics the pool is still raised to the floor, and held there.
        decision = decide(spec, 1, [], now)
        expected = (5, Reason.SCHEDULE_FLOOR) if offset in active else (1, Reason.NO_METRICS)
        assert (decision.desired, decision.reason) == expected


def test_floor_holds_an_idle_pool_during_working_hours_and_releases_after() -> None:
    spec = make_spec(timeZone="Asia/Kamchatka", schedule=WORKING_DAY, scaleDown={"stabilizationWindowSeconds": 0, "maxStep": 10})
    during = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)  # 13:00 in Kamchatka
    decision = decide(spec, 6, [MetricSample(during, queue_time_p95_ms=1)], during)
    assert (decision.desired, decision.reason) == (5, Reason.SCHEDULE_FLOOR)
    after = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # 20:00 in Kamchatka
    decision = decide(spec, 5, [MetricSample(after, queue_time_p95_ms=1)], after)
    assert (decision.desired, decision.reason) == (1, Reason.LOAD_BELOW_TARGETS)


def test_overnight_window_and_lead_time() -> None:
    spec = make_spec(timeZone="Asia/Vladivostok", schedule=[
        {"name": "night", "days": ["Mon"], "start": "22:00", "end": "06:00", "minReplicas": 2, "leadMinutes": 30}])
    tz = zoneinfo.ZoneInfo("Asia/Vladivostok")
    window = spec.schedule[0]
    expectations = {
        datetime(2026, 3, 2, 21, 29, tzinfo=tz): False,  # Monday, before the lead
        datetime(2026, 3, 2, 21, 30, tzinfo=tz): True,  # lead time
        datetime(2026, 3, 2, 23, 0, tzinfo=tz): True,
        datetime(2026, 3, 3, 5, 59, tzinfo=tz): True,  # Tuesday morning, same window
        datetime(2026, 3, 3, 6, 0, tzinfo=tz): False,
        datetime(2026, 3, 3, 23, 0, tzinfo=tz): False,  # Tuesday night: not in days
    }
    for now, active in expectations.items():
        assert window_active(window, spec, now) is active, now


def test_highest_active_floor_wins_and_is_capped_by_max() -> None:
    spec = make_spec(replicas={"min": 1, "max": 4}, schedule=[
        {"name": "a", "days": ["Mon"], "start": "10:00", "end": "18:00", "minReplicas": 2},
        {"name": "b", "days": ["Mon"], "start": "14:00", "end": "16:00", "minReplicas": 4},
    ])
    b = bounds(spec, MONDAY_NOON)  # 15:00 in Moscow: both windows
    assert (b.lower, b.floor, b.window) == (4, 4, "b")


def test_clamp_uses_bounds_only() -> None:
    spec = make_spec(replicas={"min": 2, "max": 3})
    assert (clamp(spec, 0, MONDAY_NOON).desired, clamp(spec, 0, MONDAY_NOON).reason) == (2, Reason.MIN_REPLICAS)
    assert clamp(spec, 9, MONDAY_NOON).reason is Reason.MAX_REPLICAS
    assert (clamp(spec, 3, MONDAY_NOON).desired, clamp(spec, 3, MONDAY_NOON).reason) == (3, Reason.WITHIN_BOUNDS)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError):
        decide(make_spec(), 1, [], datetime(2026, 3, 2, 12, 0))


def test_decision_is_a_plain_value() -> None:
    decision = decide(make_spec(), 2, series(MONDAY_NOON, queue_time_p95_ms=400), MONDAY_NOON)
    assert isinstance(decision, Decision) and decision.recommendation == 4 and decision.latest is not None
