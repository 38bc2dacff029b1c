"""Prometheus metrics of the gateway and the router (prometheus-client).

Names follow Prometheus conventions: base units in the name (``_seconds``), ``_total`` on
counters, one registry per process (not the global one, which Ray's own libraries share).

Label values always come from a bounded set, never from free text in a request:

- ``region``, ``institution``: the deployment's configuration (``MOSMEDAI_REGION``,
  ``MOSMEDAI_INSTITUTION``); there is no authentication yet, so every request is counted
  under the configured pair.
- ``modality``: DICOM Modality (0008,0060) from the fixed list :data:`MODALITIES`; any other
  value is ``OT``, an empty one ``unknown``.
- ``tool``: the enabled tools (configuration); ``reason``: the gateway's fixed refusal codes;
  ``endpoint``: the route template (``/v2/models/{tool}``), ``unmatched`` for no route.

The hot path only increments children bound once (``labels()`` is a dict lookup).
"""

from __future__ import annotations

from collections import OrderedDict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# DICOM PS3.3 C.7.3.1.1.1 defined terms that imaging AI reads; anything else counts as OT.
MODALITIES = frozenset({"CR", "DX", "DR", "MG", "CT", "MR", "PT", "NM", "US", "XA", "RF", "IO", "PX", "OT"})

# Time to result (seconds): sub-second from receipt on an idle platform, up to hours from
# acquisition when a PACS forwards late. 900 s is the SLO threshold (95 % within 15 min)
# and must stay a bucket boundary: the SLO rules select le="900".
TIME_TO_RESULT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
SLO_THRESHOLD_SECONDS = 900
# Images per Triton request: powers of two up to the largest configurable batch (64).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# One Triton call or one request to the gateway (seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def modality_label(modality: str) -> str:
    if not modality:
        return "unknown"
    return modality if modality in MODALITIES else "OT"


class GatewayMetrics:
    """What one gateway replica counts. ``region``/``institution`` are fixed at start."""

    def __init__(self, region: str, institution: str, utc_offset_hours: float, tools: list[str],
                 registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.region, self.institution = region, institution
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
        region_offset = Gauge(
            "mosmedai_region_utc_offset_seconds",
            "The region's UTC offset, seconds (configuration): rules derive its working hours from it.",
            ("region",), registry=r)
        region_offset.labels(region).set(utc_offset_hours * 3600.0)

        self._images: dict[str, object] = {}
        self._ttr: dict[tuple[str, str], object] = {}
        self._recent_studies: OrderedDict[str, None] = OrderedDict()
        # Series of the configured region exist from the start (at 0), so that rate()
        # over them works from the first image and a silent region is visible as 0.
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

    def rejected_input(self, reason: str) -> None:
        self.rejected.labels(self.region, self.institution, reason).inc()

    def image_done(self, modality: str, study_uid: str, tool_outcomes: dict[str, str],
                   receipt_seconds: float, acquisition_seconds: float | None) -> None:
        """One image's result is available: count it and its time to result."""
        modality = modality_label(modality)
        self.images.labels(self.region, self.institution, modality).inc()
        for tool, outcome in tool_outcomes.items():
            self.tool_images.labels(self.region, self.institution, modality, tool, outcome).inc()
        self.time_to_result.labels(self.region, modality, "receipt").observe(receipt_seconds)
        if acquisition_seconds is not None and acquisition_seconds >= 0:
            self.time_to_result.labels(self.region, modality, "acquisition").observe(acquisition_seconds)
        recent = self._recent_studies
        if study_uid in recent:
            recent.move_to_end(study_uid)
        else:
            recent[study_uid] = None
            if len(recent) > 65536:
                recent.popitem(last=False)
            self.studies.labels(self.region, self.institution, modality).inc()

    def image_failed(self, modality: str, tool_outcomes: dict[str, str]) -> None:
        modality = modality_label(modality)
        self.images_failed.labels(self.region, self.institution, modality).inc()
        for tool, outcome in tool_outcomes.items():
            self.tool_images.labels(self.region, self.institution, modality, tool, outcome).inc()

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


class RouterMetrics:
    """What one router replica counts, per tool."""

    def __init__(self, tools: list[str], registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        batch_size = Histogram(
            "mosmedai_router_batch_size", "Images per batch the router formed, per tool.",
            ("tool",), buckets=BATCH_SIZE_BUCKETS, registry=r)
        queue_depth = Gauge(
            "mosmedai_router_queue_depth",
            "Images waiting in the router for their tool's next batch (the ingest backlog).",
            ("tool",), registry=r)
        queue_seconds = Histogram(
            "mosmedai_router_queue_wait_seconds",
            "Seconds an image waited in the router before its batch left for Triton, per tool.",
            ("tool",), buckets=LATENCY_BUCKETS, registry=r)
        triton_seconds = Histogram(
            "mosmedai_router_triton_request_duration_seconds",
            "Seconds of one Triton inference call (one batch of equal-shape images), retries included.",
            ("tool",), buckets=LATENCY_BUCKETS, registry=r)
        self.triton_requests = Counter(
            "mosmedai_router_triton_requests",
            "Triton inference calls by outcome: ok, unavailable (503), deadline (504), error (502).",
            ("tool", "outcome"), registry=r)
        # Children bound once: the batch path does attribute lookups only.
        self.batch_size = {tool: batch_size.labels(tool) for tool in tools}
        self.queue_depth = {tool: queue_depth.labels(tool) for tool in tools}
        self.queue_seconds = {tool: queue_seconds.labels(tool) for tool in tools}
        self.triton_seconds = {tool: triton_seconds.labels(tool) for tool in tools}
        for tool in tools:
            for outcome in ("ok", "unavailable", "deadline", "error"):
                self.triton_requests.labels(tool, outcome)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


TRITON_OUTCOME = {503: "unavailable", 504: "deadline", 502: "error"}


class ReadinessCollector:
    """``mosmedai_triton_ready`` and ``mosmedai_tool_ready{tool}``, asked of Triton at scrape time.

    Runs in the metrics server's thread (a blocking gRPC client with a short deadline),
    never on the router's event loop; a scrape sees the state of that moment.
    """

    def __init__(self, triton_target: str, tools: list[str], timeout_s: float = 2.0):
        self.target, self.tools, self.timeout_s = triton_target, list(tools), timeout_s
        self._client = None

    def _states(self) -> tuple[bool, dict[str, bool]]:
        import tritonclient.grpc as grpcclient

        try:
            if self._client is None:
                self._client = grpcclient.InferenceServerClient(self.target)
            if not self._client.is_server_ready(client_timeout=self.timeout_s):
                return False, {tool: False for tool in self.tools}
            return True, {tool: bool(self._client.is_model_ready(tool, client_timeout=self.timeout_s))
                          for tool in self.tools}
        except Exception:
            return False, {tool: False for tool in self.tools}

    def describe(self):
        return [GaugeMetricFamily("mosmedai_triton_ready", ""), GaugeMetricFamily("mosmedai_tool_ready", "")]

    def collect(self):
        server, tools = self._states()
        ready = GaugeMetricFamily("mosmedai_triton_ready",
                                  "1 when the router's Triton answers ready, checked at scrape time.")
        ready.add_metric([], 1.0 if server else 0.0)
        tool = GaugeMetricFamily("mosmedai_tool_ready",
                                 "1 when the tool's ensemble is loaded and ready in the router's Triton.",
                                 labels=("tool",))
        for name, state in tools.items():
            tool.add_metric([name], 1.0 if state else 0.0)
        return [ready, tool]


def start_router_metrics_server(metrics: RouterMetrics, host: str, first_port: int, ports: int):
    """Serve the registry on the first free port of ``first_port .. first_port + ports - 1``.

    Each router replica takes one; Prometheus scrapes the whole range. Returns the port,
    or None when every port is taken (the router serves on regardless).
    """
    from prometheus_client import start_http_server

    for port in range(first_port, first_port + ports):
        try:
            start_http_server(port, addr=host, registry=metrics.registry)
            return port
        except OSError:
            continue
    return None
