"""Shadow runs: a candidate tool version runs beside the live one on a share of a region's
images, and its agreement with the live version is counted.

Owns: picking the images (the caller's ``ToolView.shadow``: version and share, from
``mosmedai.catalog.tool_config``), running the candidate only after the live answer is decided (a
bounded background queue of the gateway replica: never on the answer's path; full, an image is
not shadowed and that is counted), storing each comparison in the object store beside the
answered-study records, and the agreement figures per tool, version and region.

A shadow result is never returned to the tenant, never written into a result object (SR,
secondary capture) and never sent to a PACS: only these records hold it. In the router a shadow
image waits in the lowest priority class, behind every live image, and does not count toward
the tenant's fair share. And the queue hands a run to the router only once the replica's live
work has paused for ``QUIET_S``: on shared cores (a CPU pool, or a GPU pool's decode) a shadow run
beside a live study would slow it. Under continuous live traffic the queue fills and further
images are not shadowed (counted as dropped): shadow runs use spare capacity only.

Records (results bucket), one per (tenant, tool, shadow version, study, image or series)::

    shadow/<tenant>/<tool>/<version>/<study>/<sop or series uid>.json
      {"tenant", "region", "study_instance_uid", "item", "tool", "live_version", "shadow_version",
       "live": {"positive", "probability", "measurements": {name: value}, "categories": {name: label}},
       "shadow": {...the same...}, "at": <epoch s>}

Agreement (`agreement`) over the records of one (tool, version, region): positive agreement
2a/(2a+b+c) and negative agreement 2d/(2d+b+c) (a: both positive, d: both negative, b and c:
discordant), overall agreement and Cohen's kappa of positive/negative; Cohen's kappa of each
category measurement (e.g. ``density_category``); the mean absolute difference of each numeric
measurement and of the probability.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import Counter as Tally
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from types import SimpleNamespace
from typing import Awaitable, Callable, Iterable

from mosmedai.catalog.families import IMAGE
from mosmedai.results.findings import tool_result

log = logging.getLogger("mosmedai.studies.shadow")

PREFIX = "shadow/"
#: Why shadow_agreement can be null (GET /v1/tools/{tool}/quality).
AGREEMENT_STATUS = ("shadow_agreement of a version counts its shadow runs on the caller tenant's studies against "
                    "the live version's answers (mosmedai.studies.shadow); null when that version ran in shadow on none")


def record_key(tenant: str, tool: str, version: int, study_uid: str, item_uid: str) -> str:
    return f"{PREFIX}{tenant}/{tool}/{version}/{study_uid}/{item_uid}.json"


def slim(item):
    """The work item without its decoded source pixels (a radiograph's are 10 MB): a queued
    shadow run keeps only the transport tensors and the UIDs its result names."""
    images = [SimpleNamespace(sop_instance_uid=image.sop_instance_uid, series_instance_uid=image.series_instance_uid,
                              study_instance_uid=image.study_instance_uid) for image in item.images]
    return replace(item, images=images)


def summary(result) -> dict:
    """What a comparison keeps of one tool result (``ToolResult``)."""
    return {"positive": bool(result.findings),
            "probability": result.scores.get("probability"),
            "measurements": {m.name: m.value for m in result.measurements if m.value is not None and m.label is None},
            "categories": {m.name: m.label for m in result.measurements if m.label is not None}}


class ShadowMetrics:
    def __init__(self, registry):
        from prometheus_client import Counter

        self.runs = Counter(
            "mosmedai_shadow_runs",
            "Shadow runs of a candidate tool version, by outcome: agree / disagree (positive or negative "
            "as the live version), failed (the candidate failed), dropped (the shadow queue was full).",
            ("tool", "version", "region", "outcome"), registry=registry)


#: how long (s) the replica's live work must have paused before a shadow run is sent
QUIET_S = 0.05


class ShadowRunner:
    """The gateway replica's shadow queue.

    ``infer(tenant, region, tool, version, tensors)`` runs one tool version on one item and
    returns the router's outputs of that tool; ``put(key, body)`` stores a record (blocking:
    run in a thread). At most ``max_queued`` items wait and ``concurrency`` run at once.
    ``quiet()``: seconds since the replica's live work last paused (0 while some runs); a run
    waits until it is QUIET_S."""

    def __init__(self, infer: Callable[..., Awaitable[dict]], put: Callable[[str, bytes], None],
                 metrics: ShadowMetrics | None = None, *, max_queued: int = 32, concurrency: int = 1,
                 draw: Callable[[], float] = random.random, quiet: Callable[[], float] | None = None):
        self.infer, self.put, self.metrics, self.draw, self.quiet = infer, put, metrics, draw, quiet
        self.max_queued, self.concurrency = max_queued, concurrency
        self.queue: asyncio.Queue | None = None
        self.workers: list[asyncio.Task] = []
        self.stored = 0  # records stored by this replica (tests, logs)

    def _count(self, tool: str, version: int, region: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.runs.labels(tool, str(version), region, outcome).inc()

    def offer(self, tenant, view, items, item_results) -> int:
        """After the live answer is decided: queue the items the view shadows (drawn at its
        share). Never waits. Returns how many were queued."""
        shadow = view.shadow or {}
        if not shadow:
            return 0
        if self.queue is None:
            self.queue = asyncio.Queue(self.max_queued)
        while len(self.workers) < self.concurrency:
            self.workers.append(asyncio.get_running_loop().create_task(self._work_forever()))
        queued = 0
        for item, result in zip(items, item_results):
            for tool, run in shadow.items():
                if tool not in item.tools or self.draw() >= run.share:
                    continue
                live = next((entry for entry in result.tools if entry.tool == tool), None)
                if live is None:
                    continue
                try:
                    self.queue.put_nowait((tenant.id, view.region, tool, run.version, slim(item), live, time.time()))
                    queued += 1
                except asyncio.QueueFull:  # a shadow run never makes live work wait
                    self._count(tool, run.version, view.region, "dropped")
        return queued

    async def _work_forever(self) -> None:
        while True:
            entry = await self.queue.get()
            try:
                while self.quiet is not None and self.quiet() < QUIET_S:
                    await asyncio.sleep(QUIET_S)
                await self._run(*entry)
            except Exception:  # one bad run must not stop the queue
                log.exception("shadow run failed")
            finally:
                self.queue.task_done()

    async def _run(self, tenant: str, region: str, tool: str, version: int, item, live, at: float) -> None:
        outputs = await self.infer(tenant, region, tool, version, item.tensors)
        if "error" in outputs:
            self._count(tool, version, region, "failed")
            log.info("shadow run of %s version %s failed: %s", tool, version, outputs["error"])
            return
        candidate = tool_result(tool, outputs, item)
        item_uid = item.first.sop_instance_uid if item.kind == IMAGE else item.first.series_instance_uid
        study_uid = item.first.study_instance_uid
        record = {"tenant": tenant, "region": region, "study_instance_uid": study_uid, "item": item_uid,
                  "tool": tool, "live_version": live.model_version, "shadow_version": str(version),
                  "live": summary(live), "shadow": summary(candidate), "at": at}
        body = json.dumps(record, sort_keys=True).encode()
        await asyncio.to_thread(self.put, record_key(tenant, tool, version, study_uid, item_uid), body)
        self.stored += 1
        agree = record["live"]["positive"] == record["shadow"]["positive"]
        self._count(tool, version, region, "agree" if agree else "disagree")

    async def idle(self, timeout_s: float = 30.0) -> bool:
        """Wait until the queue is empty and no run is in flight (shutdown, tests)."""
        if self.queue is None:
            return True
        try:
            await asyncio.wait_for(self.queue.join(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


# --- agreement --------------------------------------------------------------------------------
def _kappa(pairs: list[tuple]) -> float | None:
    """Cohen's kappa of paired labels; None when undefined (no pairs, or chance agreement 1)."""
    if not pairs:
        return None
    n = len(pairs)
    observed = sum(1 for a, b in pairs if a == b) / n
    first, second = Tally(a for a, _ in pairs), Tally(b for _, b in pairs)
    expected = sum(first[k] * second[k] for k in set(first) | set(second)) / (n * n)
    if expected >= 1.0:
        return 1.0 if observed == 1.0 else None
    return round((observed - expected) / (1.0 - expected), 4)


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def agreement(records: Iterable[dict]) -> dict:
    """The agreement of shadow results with live ones over these records (one tool version)."""
    records = list(records)
    a = sum(1 for r in records if r["live"]["positive"] and r["shadow"]["positive"])
    d = sum(1 for r in records if not r["live"]["positive"] and not r["shadow"]["positive"])
    b = sum(1 for r in records if r["live"]["positive"] and not r["shadow"]["positive"])
    c = sum(1 for r in records if not r["live"]["positive"] and r["shadow"]["positive"])
    n = len(records)
    probabilities = [abs(r["live"]["probability"] - r["shadow"]["probability"]) for r in records
                     if r["live"].get("probability") is not None and r["shadow"].get("probability") is not None]
    categories: dict[str, list[tuple]] = {}
    measurements: dict[str, list[float]] = {}
    for r in records:
        for name, label in r["live"].get("categories", {}).items():
            if name in r["shadow"].get("categories", {}):
                categories.setdefault(name, []).append((label, r["shadow"]["categories"][name]))
        for name, value in r["live"].get("measurements", {}).items():
            other = r["shadow"].get("measurements", {}).get(name)
            if other is not None and math.isfinite(value) and math.isfinite(other):
                measurements.setdefault(name, []).append(abs(value - other))
    return {
        "n": n, "both_positive": a, "both_negative": d, "live_only_positive": b, "shadow_only_positive": c,
        "positive_agreement": _ratio(2 * a, 2 * a + b + c),
        "negative_agreement": _ratio(2 * d, 2 * d + b + c),
        "overall_agreement": _ratio(a + d, n),
        "kappa": _kappa([(r["live"]["positive"], r["shadow"]["positive"]) for r in records]),
        "probability_mean_absolute_difference": round(sum(probabilities) / len(probabilities), 4) if probabilities else None,
        "categories": {name: {"n": len(pairs), "agreement": _ratio(sum(1 for x, y in pairs if x == y), len(pairs)),
                              "kappa": _kappa(pairs)} for name, pairs in sorted(categories.items())},
        "measurements": {name: {"n": len(diffs), "mean_absolute_difference": round(sum(diffs) / len(diffs), 4)}
                         for name, diffs in sorted(measurements.items())},
        "live_versions": sorted({r["live_version"] for r in records}),
    }


def read_records(store, bucket: str, tool: str, tenant: str | None = None, version: int | None = None) -> list[dict]:
    """The stored comparisons of a tool (one tenant's, or every tenant's), optionally of one version."""
    prefix = f"{PREFIX}{tenant}/{tool}/" if tenant else PREFIX
    keys = []
    for key in store.list(bucket, prefix):
        parts = key[len(PREFIX):].split("/")
        if len(parts) != 5 or parts[1] != tool or (version is not None and parts[2] != str(version)):
            continue
        keys.append(key)
    with ThreadPoolExecutor(8) as pool:
        return [json.loads(body) for body in pool.map(lambda key: store.get(bucket, key), keys)]


def by_version_and_region(records: Iterable[dict]) -> dict[tuple[str, str], dict]:
    """(shadow version, region) -> agreement."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["shadow_version"], record["region"]), []).append(record)
    return {key: agreement(group) for key, group in sorted(groups.items())}


def format_comparison(tool: str, version: int, groups: dict[tuple[str, str], dict]) -> str:
    """`mosmedai tools compare`'s table."""
    lines = [f"{tool} version {version} in shadow beside the live version, per region",
             f"{'region':<8} {'n':>5} {'live':>5} {'pos.agr':>8} {'neg.agr':>8} {'kappa':>6} {'prob.MAD':>9}  measurements"]

    def show(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    for (_, region), figures in groups.items():
        extra = [f"{name} MAD {m['mean_absolute_difference']:.3f}" for name, m in figures["measurements"].items()]
        extra += [f"{name} kappa {show(c['kappa'])}" for name, c in figures["categories"].items()]
        lines.append(f"{region:<8} {figures['n']:>5} {','.join(figures['live_versions']):>5} "
                     f"{show(figures['positive_agreement']):>8} {show(figures['negative_agreement']):>8} "
                     f"{show(figures['kappa']):>6} {show(figures['probability_mean_absolute_difference']):>9}  "
                     + ("; ".join(extra) or "-"))
    if not groups:
        lines.append("(no shadow runs of this version yet)")
    return "\n".join(lines)
