"""Prometheus metrics of the gateway replicas (prometheus-client); the router's are in
``mosmedai.serving.metrics``.

Names follow Prometheus conventions: base units in the name (``_seconds``), ``_total`` on
counters, one registry per process (not the global one, which Ray's own libraries share).

Label values always come from a bounded set, never from free text in a request:

- ``region``, ``institution``: the authenticated tenant's region (ISO 3166-2:RU) and id, so
  their values are bounded by the tenants file; requests refused before a tenant is known
  (bad token) count under ``unknown``.
- ``pool``: the pool directory's names.
- ``modality``: DICOM Modality (0008,0060) from the fixed list :data:`MODALITIES`; any other
  value is ``OT``, an empty one ``unknown``.
- ``tool``: the enabled tools (configuration); ``reason``: the gateway's fixed refusal codes;
  ``endpoint``: the route template (``/v2/models/{tool}``), ``unmatched`` for no route.
- ``version``: the Triton model version that answered (digits; anything else ``unknown``),
  bounded by the versions deployed; ``verdict``: the fixed feedback verdicts.

The hot path only increments children bound once (``labels()`` is a dict lookup).
"""

from __future__ import annotations

from collections import OrderedDict

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from mosmedai.catalog.regions import utc_offset_hours  # noqa: F401 (part of this module's API)
from mosmedai.results.schemas import VERDICTS
from mosmedai.serving.metrics import LATENCY_BUCKETS

# DICOM PS3.3 C.7.3.1.1.1 defined terms that imaging AI reads; anything else counts as OT.
MODALITIES = frozenset({"CR", "DX", "DR", "MG", "CT", "MR", "PT", "NM", "US", "XA", "RF", "IO", "PX", "OT"})

# Time to result (seconds): sub-second from receipt on an idle platform, up to hours from
# acquisition when a PACS forwards late. 900 s is the SLO threshold (95 % within 15 min)
# and must stay a bucket boundary: the SLO rules select le="900".
TIME_TO_RESULT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
SLO_THRESHOLD_SECONDS = 900


def modality_label(modality: str) -> str:
    if not modality:
        return "unknown"
    return modality if modality in MODALITIES else "OT"


class GatewayMetrics:
    """What one gateway replica counts, labelled by the tenant that sent it."""

    def __init__(self, tenants, tools: list[str], registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mosmedai_gateway_http_requests", "HTTP requests answered, by route template, method and status code.",
            ("endpoint", "method", "code"), registry=r)
        self.request_seconds = Histogram(
            "mosmedai_gateway_http_request_duration_seconds",
            "Time from the request's arrival to the end of the answer, seconds, by route template.",
            ("endpoint",), buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter(
            "mosmedai_images", "Images whose result was returned (every selected tool answered).",
            ("region", "institution", "modality"), registry=r)
        self.images_failed = Counter(
            "mosmedai_images_failed",
            "Accepted images whose result could not be given because a tool failed (5xx).",
            ("region", "institution", "modality"), registry=r)
        self.studies = Counter(
            "mosmedai_studies",
            "Studies seen for the first time by this replica (Study Instance UID not among its "
            "recent 65536), counted when their first image's result is returned.",
            ("region", "institution", "modality"), registry=r)
        self.tool_images = Counter(
            "mosmedai_tool_images", "Images each tool analysed, by outcome (positive, negative, failed).",
            ("region", "institution", "modality", "tool", "outcome"), registry=r)
        self.time_to_result = Histogram(
            "mosmedai_time_to_result_seconds",
            "Seconds until a result is available: origin=receipt from the request's arrival, "
            "origin=acquisition from the DICOM acquisition date/time (when the header has one).",
            ("region", "modality", "origin"), buckets=TIME_TO_RESULT_BUCKETS, registry=r)
        self.rejected = Counter(
            "mosmedai_rejected_inputs", "Requests refused as bad input (4xx), by the refusal code.",
            ("region", "institution", "reason"), registry=r)
        self.shed = Counter(
            "mosmedai_shed",
            "Synchronous studies refused under load: overloaded (503, no pool could finish within the "
            "deadline), fair_share (429, the tenant held more than its share), retry_budget (503).",
            ("region", "institution", "reason"), registry=r)
        self.backlog = Gauge(
            "mosmedai_jobs_backlog",
            "Accepted asynchronous studies (job API, STOW-RS, DIMSE) not yet done, per tenant region.",
            ("region",), registry=r)
        region_offset = Gauge(
            "mosmedai_region_utc_offset_seconds",
            "The region's UTC offset, seconds (data/region_utc_offsets.csv): rules derive its working hours.",
            ("region",), registry=r)
        self.feedback = Counter(
            "mosmedai_feedback",
            "Radiologists' feedback, once per (study, tool, reviewer), by the tool, the model version whose "
            "result was judged, the tenant's region and the verdict (agree, disagree, image_defect).",
            ("tool", "version", "region", "verdict"), registry=r)
        self._feedback_series: set[tuple[str, str, str]] = set()
        self._recent_studies: OrderedDict[str, None] = OrderedDict()
        # Series of every tenant exist from the start (at 0), so that rate() over them works
        # from the first image and a silent region is visible as 0.
        for tenant in tenants:
            region, institution = tenant.region, tenant.id
            region_offset.labels(region).set(utc_offset_hours(region) * 3600.0)
            self.backlog.labels(region).set(0)
            for modality in ("DX", "CR"):
                self.images.labels(region, institution, modality)
                self.images_failed.labels(region, institution, modality)
                self.studies.labels(region, institution, modality)
                for origin in ("receipt", "acquisition"):
                    self.time_to_result.labels(region, modality, origin)
                for tool in tools:
                    for outcome in ("positive", "negative", "failed"):
                        self.tool_images.labels(region, institution, modality, tool, outcome)

    def observe_request(self, endpoint: str, method: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(code)).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def rejected_input(self, tenant, reason: str) -> None:
        region, institution = (tenant.region, tenant.id) if tenant is not None else ("unknown", "unknown")
        self.rejected.labels(region, institution, reason).inc()

    def shed_study(self, tenant, reason: str) -> None:
        self.shed.labels(tenant.region, tenant.id, reason).inc()

    def set_backlog(self, per_region: dict[str, int]) -> None:
        for region, count in per_region.items():
            self.backlog.labels(region).set(count)

    def feedback_possible(self, region: str, tool: str, version: str) -> None:
        """A tool version answered in the region: its feedback series exist from now on, at 0,
        so that increase() counts the first feedback too (one set lookup when they exist)."""
        if (tool, version, region) in self._feedback_series:
            return
        self._feedback_series.add((tool, version, region))
        for verdict in VERDICTS:
            self.feedback.labels(tool, version, region, verdict)

    def feedback_given(self, tenant, tool: str, version: str, verdict: str) -> None:
        self.feedback_possible(tenant.region, tool, version)
        self.feedback.labels(tool, version, tenant.region, verdict).inc()

    def image_done(self, tenant, modality: str, study_uid: str, tool_outcomes: dict[str, str],
                   receipt_seconds: float, acquisition_seconds: float | None) -> None:
        """One image's result is available: count it and its time to result."""
        modality = modality_label(modality)
        region, institution = tenant.region, tenant.id
        self.images.labels(region, institution, modality).inc()
        for tool, outcome in tool_outcomes.items():
            self.tool_images.labels(region, institution, modality, tool, outcome).inc()
        self.time_to_result.labels(region, modality, "receipt").observe(receipt_seconds)
        if acquisition_seconds is not None and acquisition_seconds >= 0:
            self.time_to_result.labels(region, modality, "acquisition").observe(acquisition_seconds)
        recent = self._recent_studies
        if study_uid in recent:
            recent.move_to_end(study_uid)
        else:
            recent[study_uid] = None
            if len(recent) > 65536:
                recent.popitem(last=False)
            self.studies.labels(region, institution, modality).inc()

    def image_failed(self, tenant, modality: str, tool_outcomes: dict[str, str]) -> None:
        modality = modality_label(modality)
        self.images_failed.labels(tenant.region, tenant.id, modality).inc()
        for tool, outcome in tool_outcomes.items():
            self.tool_images.labels(tenant.region, tenant.id, modality, tool, outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# The gateway replica's metrics, for the request middleware and the refusal handler. A
# module attribute set through a function: Ray Serve ships the ingress class by value, so a
# `global` statement in its __init__ would write to a copy of the gateway module's globals.
_gateway: GatewayMetrics | None = None


def install_gateway_metrics(metrics: GatewayMetrics) -> None:
    global _gateway
    _gateway = metrics


def gateway_metrics() -> GatewayMetrics | None:
    return _gateway


