"""The operator's own metrics (prometheus-client), served on ``metrics_port``."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

POOL_LABELS = ("namespace", "pool", "region")

SCALING_DECISIONS = Counter(
    "mosmedai_operator_scaling_decisions_total",
    "Scaling decisions per pool, by reason (policy.Reason), holds included.",
    (*POOL_LABELS, "reason"),
)
DESIRED_REPLICAS = Gauge(
    "mosmedai_operator_desired_replicas",
    "Replicas the operator last asked for, per pool.",
    POOL_LABELS,
)
READY_REPLICAS = Gauge(
    "mosmedai_operator_ready_replicas",
    "Ready Triton replicas last seen on the pool's Deployment.",
    POOL_LABELS,
)
POOL_VALID = Gauge(
    "mosmedai_operator_pool_spec_valid",
    "1 when the pool's spec was accepted, 0 when it was refused (see the pool's conditions).",
    POOL_LABELS,
)
PROMETHEUS_ERRORS = Counter(
    "mosmedai_operator_prometheus_errors_total",
    "Failed Prometheus queries (the pool held its size).",
    POOL_LABELS,
)
CHILD_WRITES = Counter(
    "mosmedai_operator_child_writes_total",
    "Children created or patched back to the desired state (drift repairs included).",
    ("namespace", "pool", "kind", "action"),
)
RECONCILE_SECONDS = Histogram(
    "mosmedai_operator_reconcile_seconds",
    "Duration of one pool reconcile, seconds; trigger=timer includes the Prometheus queries.",
    ("trigger",),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter(
    "mosmedai_operator_reconcile_errors_total",
    "Reconciles that ended in a retry (kopf.TemporaryError).",
    POOL_LABELS,
)

_PER_POOL = (DESIRED_REPLICAS, READY_REPLICAS, POOL_VALID)


def forget_pool(namespace: str, pool: str, region: str) -> None:
    """Drop a deleted pool's gauges so that dashboards do not show it forever."""
    for gauge in _PER_POOL:
        try:
            gauge.remove(namespace, pool, region)
        except KeyError:
            pass
