"""Pure helpers for a GpuPool's status: conditions and minimal status patches.

Conditions follow metav1.Condition (type, status, reason, message, lastTransitionTime,
observedGeneration): https://github.com/kubernetes/community/blob/master/contributors/devel/sig-architecture/api-conventions.md#typical-status-properties
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

READY, SCALING, DEGRADED = "Ready", "Scaling", "Degraded"
CONDITION_TYPES = (READY, SCALING, DEGRADED)


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC with a Z, whole seconds, as Kubernetes writes times."""
    return now.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, status: bool | None, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "Unknown" if status is None else ("True" if status else "False"),
        "reason": reason,
        "message": message,
    }


def get_condition(status: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for item in status.get("conditions") or []:
        if item.get("type") == kind:
            return dict(item)
    return None


def merge_conditions(old: Iterable[Mapping[str, Any]] | None, new: Iterable[dict[str, Any]], now: datetime, generation: int | None) -> list[dict[str, Any]]:
    """The new conditions, keeping lastTransitionTime where the status did not change.

    Conditions of other types in ``old`` (written by someone else) are kept as they are.
    """
    previous = {item.get("type"): item for item in old or []}
    result: dict[str, dict[str, Any]] = {k: dict(v) for k, v in previous.items()}
    for item in new:
        before = previous.get(item["type"])
        changed = before is None or before.get("status") != item["status"]
        merged = dict(item)
        merged["lastTransitionTime"] = timestamp(now) if changed else before.get("lastTransitionTime", timestamp(now))
        if generation is not None:
            merged["observedGeneration"] = generation
        result[item["type"]] = merged
    order = {kind: i for i, kind in enumerate(CONDITION_TYPES)}
    return sorted(result.values(), key=lambda c: (order.get(c.get("type"), len(order)), str(c.get("type"))))


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Only the top-level status fields that changed (None deletes a field)."""
    return {key: value for key, value in new.items() if old.get(key) != value and not (value is None and key not in old)}
