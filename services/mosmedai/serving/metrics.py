"""Prometheus metrics of the router replicas (prometheus-client): batches, queues, Triton calls,
routes and pool state; ``ReadinessCollector`` asks each pool's Triton at scrape time.

Conventions as in ``mosmedai.ingress.metrics``: base units in names, ``_total`` on counters,
one registry per process, label values from bounded sets.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

# Images per Triton request: powers of two up to the largest configurable batch (64).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# One Triton call or one request to the gateway (seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    """What one router replica counts: per tool, and per pool for what reaches Triton."""

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
        self.triton_seconds = Histogram(
            "mosmedai_router_triton_request_duration_seconds",
            "Seconds of one Triton inference call (one batch of equal-shape images), per pool and tool.",
            ("pool", "tool"), buckets=LATENCY_BUCKETS, registry=r)
        self.triton_requests = Counter(
            "mosmedai_router_triton_requests",
            "Triton inference calls by outcome: ok, unavailable (503), deadline (504), error (502).",
            ("pool", "tool", "outcome"), registry=r)
        self.routed = Counter(
            "mosmedai_router_routed",
            "Images answered by a pool, by the pool, the image's home pool, tool and route "
            "(home, spill: the home pool was busy, failover: it was down).",
            ("pool", "home_pool", "tool", "route"), registry=r)
        self.pool_up = Gauge(
            "mosmedai_pool_up", "1 while the router sends to the pool (ready and not ejected), else 0.",
            ("pool",), registry=r)
        self.pool_wait = Gauge(
            "mosmedai_pool_expected_wait_seconds",
            "The router's expected wait of a new routine image at the pool (s).", ("pool",), registry=r)
        # Children bound once: the batch path does attribute lookups only.
        self.batch_size = {tool: batch_size.labels(tool) for tool in tools}
        self.queue_depth = {tool: queue_depth.labels(tool) for tool in tools}
        self.queue_seconds = {tool: queue_seconds.labels(tool) for tool in tools}
        self._pools: list[str] = []

    def known_pools(self, names: list[str]) -> None:
        """The directory changed: series of pools that left it are dropped."""
        for gone in set(self._pools) - set(names):
            for gauge in (self.pool_up, self.pool_wait):
                try:
                    gauge.remove(gone)
                except KeyError:
                    pass
        self._pools = list(names)

    def observe_pools(self, pools) -> None:
        for pool in pools:
            self.pool_up.labels(pool.name).set(1.0 if pool.up() else 0.0)
            self.pool_wait.labels(pool.name).set(pool.expected_wait_s())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


TRITON_OUTCOME = {503: "unavailable", 504: "deadline", 502: "error"}


class ReadinessCollector:
    """``mosmedai_triton_ready{pool}`` and ``mosmedai_tool_ready{pool,tool}``, asked of each
    pool's Triton at scrape time.

    Runs in the metrics server's thread (blocking gRPC clients with a short deadline), never
    on the router's event loop; a scrape sees the state of that moment. ``targets()`` gives
    {pool: (gRPC endpoint, tools)}.
    """

    def __init__(self, targets, timeout_s: float = 2.0, model_of=None):
        self.targets, self.timeout_s = targets, timeout_s
        self.model_of = model_of or (lambda tool: tool)  # tool -> the Triton ensemble it runs (its version)
        self._clients: dict[str, object] = {}

    def _states(self, endpoint: str, tools) -> tuple[bool, dict[str, bool]]:
        import tritonclient.grpc as grpcclient

        try:
            client = self._clients.get(endpoint)
            if client is None:
                client = self._clients[endpoint] = grpcclient.InferenceServerClient(endpoint)
            if not client.is_server_ready(client_timeout=self.timeout_s):
                return False, {tool: False for tool in tools}
            return True, {tool: bool(client.is_model_ready(self.model_of(tool), client_timeout=self.timeout_s)) for tool in tools}
        except Exception:
            return False, {tool: False for tool in tools}

    def describe(self):
        return [GaugeMetricFamily("mosmedai_triton_ready", ""), GaugeMetricFamily("mosmedai_tool_ready", "")]

    def collect(self):
        ready = GaugeMetricFamily("mosmedai_triton_ready",
                                  "1 when the pool's Triton answers ready, checked at scrape time.", labels=("pool",))
        tool = GaugeMetricFamily("mosmedai_tool_ready",
                                 "1 when the tool's ensemble is loaded and ready in the pool's Triton.",
                                 labels=("pool", "tool"))
        for pool, (endpoint, tools) in self.targets().items():
            server, states = self._states(endpoint, tools)
            ready.add_metric([pool], 1.0 if server else 0.0)
            for name, state in states.items():
                tool.add_metric([pool, name], 1.0 if state else 0.0)
        return [ready, tool]


def start_router_metrics_server(metrics: RouterMetrics, host: str, first_port: int, ports: int):
    """Serve the registry on the first free port of ``first_port .. first_port + ports - 1``.

    Each router replica takes one; Prometheus scrapes the whole range. Returns (port, the
    HTTP server: ``shutdown()`` then ``server_close()`` frees the port), or None when every
    port is taken (the router serves on regardless, and tries again later: a replica that
    replaces a draining one finds its port taken until that one exits).
    """
    from prometheus_client import start_http_server

    for port in range(first_port, first_port + ports):
        try:
            server, _ = start_http_server(port, addr=host, registry=metrics.registry)
            return port, server
        except OSError:
            continue
    return None
