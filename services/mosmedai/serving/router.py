"""The router: queues images per pool and tool, batches them, and calls Triton pools over gRPC.

Every image arrives with its study's context (tenant, tenant region, deadline, synchronous or
not). For each tool the router asks ``mosmedai.serving.routing.route`` where it runs: the region's
home pool, a neighbour when home is busy (spill) or down (failover), or nowhere (shed, at
once, before any waiting). Pools come from the pool directory (``mosmedai.serving.pools``), or from
GpuPool resources in a cluster (``mosmedai.serving.pool_discovery``).

Queues: one per (pool, tool). A batch takes urgent images first, then routine, then
screening; within a class it takes the tenants in turn (round robin), so one tenant's
backlog does not hold another's images. At most ``router_max_concurrent_batches`` batches
of a tool are in one pool's Triton at once: the rest wait here, where they are ordered,
not in Triton's queue. An image reaching an idle tool goes at once; while a batch is in
flight the next waits up to ``router_batch_wait_ms`` for company.

Versions: each tool runs the version ``settings.tool_versions`` names (1 when not named), and
a call may name another per tool (``infer_image(..., versions=)``). A version is its own
Triton ensemble (``ToolSpec.ensemble``: ``<tool>`` for 1, ``<tool>_v<N>`` after) with its
own queue, so a batch never mixes versions; each result's ``model_version`` is the tool
version that produced it (the ensemble's own Triton version is always 1). The gateway names
each caller's live version per call (``mosmedai.catalog.tool_config``); ``load_versions`` loads the
versions live anywhere in every pool that serves the tool before the gateway switches to them,
and unloads those this router loaded once they are live nowhere and idle. A shadow run
(``StudyContext.shadow``, ``mosmedai.studies.shadow``) waits in the lowest priority class.

Health (outlier detection): a pool is out of rotation while its readiness probe fails, and
for ``pool_ejection_s`` (doubling per ejection in a row) after ``pool_eject_after``
consecutive UNAVAILABLE answers; it comes back when the probe passes. Busy is not down: a
busy pool is never ejected, its expected wait makes studies spill or be shed instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
from ray import serve

from mosmedai.catalog.tools import CATALOG
from mosmedai.config import Settings
from mosmedai.serving.metrics import (
    TRITON_OUTCOME,
    ReadinessCollector,
    RouterMetrics,
    start_router_metrics_server,
)
from mosmedai.serving.model_repo import output_names
from mosmedai.serving.pools import PoolDirectory, PoolSpec, directory_for
from mosmedai.serving.routing import (
    FAILOVER,
    PRIORITY_NAMES,
    ROUTE_NAMES,
    SHED,
    URGENT,
    priority_of,
    route,
)
from mosmedai.serving.throughput import WINDOW_S, Throughput

log = logging.getLogger("mosmedai.serving.router")


@dataclass
class ImageInput:
    """One image as it travels to Triton: stored values and the grayscale parameters."""

    pixels: np.ndarray  # (rows, columns) uint16
    params: np.ndarray  # float32 [N_PARAMS]
    voi_lut: np.ndarray  # float32 [L], L >= 1 (a single 0 when the header has no table)

    @property
    def shape(self) -> tuple:
        return self.pixels.shape


@dataclass
class VolumeInput:
    """One CT series as it travels to Triton: HU sampled on the family grid, and its geometry."""

    volume: np.ndarray  # (slices, rows, columns) int16 HU on the grid
    geometry: np.ndarray  # float32 [N_GEOMETRY] (mosmedai.catalog.volumes.VolumeGeometry)

    @property
    def shape(self) -> tuple:
        return self.volume.shape


@dataclass(frozen=True)
class StudyContext:
    """Who sent a study and how long it may take: what routing and admission need."""

    tenant: str
    region: str
    deadline_s: float  # seconds from ``received`` within which the answer is due
    synchronous: bool = True  # False: accepted durably (job API, STOW-RS, DIMSE); never shed
    # A shadow run (mosmedai.studies.shadow): behind every live image (the lowest priority class),
    # outside the tenants' fair shares; its result is never an answer.
    shadow: bool = False
    # wall-clock time of arrival: gateway and router may be on different nodes (NTP-synced)
    received: float = field(default_factory=time.time)

    def remaining_s(self) -> float:
        return self.deadline_s - (time.time() - self.received)


def triton_inputs(grpc, images: list) -> list:
    """The InferInputs of one Triton request for images (or volumes) of equal shape."""
    if isinstance(images[0], VolumeInput):
        arrays = (("volume", np.stack([item.volume for item in images]), "INT16"),
                  ("geometry", np.stack([item.geometry for item in images]).astype(np.float32, copy=False), "FP32"))
    else:
        lut_length = max(len(image.voi_lut) for image in images)
        luts = np.zeros((len(images), lut_length), np.float32)
        for row, image in enumerate(images):
            luts[row, : len(image.voi_lut)] = image.voi_lut
        arrays = (("pixels", np.stack([image.pixels for image in images]), "UINT16"),
                  ("params", np.stack([image.params for image in images]).astype(np.float32, copy=False), "FP32"),
                  ("voi_lut", luts, "FP32"))
    inputs = []
    for name, array, dtype in arrays:
        tensor = grpc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class ToolFailure(Exception):
    """A tool failed in Triton; ``status`` is the HTTP status the gateway answers with."""

    def __init__(self, tool: str, status: int, message: str):
        super().__init__(f"{tool}: {message}")
        self.tool, self.status, self.message = tool, status, message


def _status_of(error: Exception) -> int:
    """HTTP status for a failed Triton call: 503 unreachable, 504 deadline, 502 otherwise."""
    status = str(getattr(error, "status", lambda: "")() or "")
    text = str(error)
    if "UNAVAILABLE" in status or "UNAVAILABLE" in text or "failed to connect" in text.lower():
        return 503
    # A model that is (re)loading - Triton starting, or a repository update - has no version
    # ready yet: unavailable for now, not broken.
    if "no available versions" in text or "is not ready" in text or "unknown model" in text.lower():
        return 503
    if "DEADLINE_EXCEEDED" in status or "Deadline" in text:
        return 504
    return 502


def _pool_draining(error: Exception) -> bool:
    """Triton refuses new requests once it got SIGTERM and is finishing what is in flight
    (``--exit-timeout-secs``): gRPC UNAVAILABLE "Server exiting"."""
    return "Server exiting" in str(error)


def _pool_unreachable(error: Exception) -> bool:
    """The pool itself did not answer (connection refused or reset): counts toward ejection.
    A tool that is not loaded there is the tool's failure, not the pool's."""
    status = str(getattr(error, "status", lambda: "")() or "")
    text = str(error)
    return "UNAVAILABLE" in status or "UNAVAILABLE" in text or "failed to connect" in text.lower()


def refusal(reason: str, status: int, detail: str, retry_after_s: float) -> dict:
    """A tool answer that says the study was not run: 503 overloaded/retry_budget, 429 fair_share."""
    return {"error": detail, "status": status, "reason": reason, "retry_after_s": max(1, math.ceil(retry_after_s))}


@dataclass
class Entry:
    """One image of one tool waiting in, or sent from, a pool's queue."""

    tool: str
    image: ImageInput | VolumeInput
    context: StudyContext
    priority: int
    home: str
    route: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    tried: tuple[str, ...] = ()  # pools that failed this image (failover skips them)
    version: int = 1  # the tool version to run (its ensemble: ToolSpec.ensemble)


def channel_args(grpc) -> list[tuple[str, int]]:
    """tritonclient's channel options, and a short reconnect backoff: gRPC's default grows to
    two minutes while a pool's Triton restarts, which would keep a restarted pool out of
    rotation that long after it is ready."""
    keepalive = grpc.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpc.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpc.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]


#: Probe rounds between two checks that every live tool version is loaded where it runs.
VERSION_CHECK_ROUNDS = 5

#: First and longest wait between two connection attempts to a pool's Triton (ms).
RECONNECT_BACKOFF_MS = (500, 2000)


class Pool:
    """One pool as this router replica sees it: its clients, health, load and queues."""

    def __init__(self, spec: PoolSpec, grpc):
        self.grpc = grpc
        self.spec = spec
        self._clients: list | None = None
        self._next = 0
        self.ready = True  # until the first probe says otherwise: a call that fails ejects it anyway
        self.ejected_until = 0.0
        self.failures = 0  # consecutive UNAVAILABLE answers
        self.ejections = 0  # ejections in a row (the ejection time doubles)
        self.in_flight = 0  # images in this pool's Triton
        self.requests_in_flight = 0  # this router's Triton requests there (batches)
        self.triton_pending = 0.0  # Triton's pending requests of the pool's tools (its metrics)
        self.queued = [0, 0, 0]  # images waiting in the router, per priority class
        self.per_image_s = 0.0  # EWMA of a batch's duration / its images
        self.finished = Throughput()  # images answered
        self.tenant_load: dict[str, int] = {}  # images queued or in flight, per tenant
        self.queues: dict[tuple[str, int], ToolQueue] = {}  # (tool, version) -> queue

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def clients(self) -> list:
        """One asyncio gRPC client per endpoint, made on first use (on the router's event loop)."""
        if self._clients is None:
            self._clients = [self.grpc.InferenceServerClient(endpoint, channel_args=channel_args(self.grpc))
                             for endpoint in self.spec.endpoints]
        return self._clients

    def client(self):
        self._next = (self._next + 1) % len(self.clients)
        return self.clients[self._next]

    def up(self, now: float | None = None) -> bool:
        return self.ready and (now or time.monotonic()) >= self.ejected_until

    def state(self) -> str:
        if not self.ready:
            return "not_ready"
        return "up" if self.up() else "ejected"

    def throughput(self) -> float:
        """Images per second the pool can take: its completions over the window when that is
        more (saturated: the measured rate is the capacity), else one image at a time per
        endpoint at the measured per-image time (idle: the rate says nothing)."""
        rate = self.finished.rate()
        single = len(self.clients) / self.per_image_s if self.per_image_s > 0 else 50.0
        return max(rate, single)

    def expected_wait_s(self, priority: int = 2) -> float:
        """Expected wait of a new image of this priority: the images ahead of it (queued in
        classes at least as urgent, and those in Triton) at the pool's throughput."""
        # Triton's own queue holds our requests and other routers': count only the others'.
        others = max(0.0, self.triton_pending - self.requests_in_flight)
        ahead = sum(self.queued[: priority + 1]) + self.in_flight + others
        return ahead / self.throughput()

    def note_success(self, images: int, seconds: float) -> None:
        self.failures = 0
        self.ejections = 0
        per_image = seconds / images
        self.per_image_s = per_image if self.per_image_s == 0 else 0.8 * self.per_image_s + 0.2 * per_image
        self.finished.done(images)

    def note_unavailable(self, settings: Settings) -> bool:
        """Count a failure; True when it takes the pool out of rotation now."""
        self.failures += 1
        if self.failures >= settings.pool_eject_after and self.up():
            self.ejections += 1
            self.ejected_until = time.monotonic() + settings.pool_ejection_s * min(8, 2 ** (self.ejections - 1))
            return True
        return False

    def hold(self, tenant: str, images: int) -> None:
        load = self.tenant_load.get(tenant, 0) + images
        if load > 0:
            self.tenant_load[tenant] = load
        else:
            self.tenant_load.pop(tenant, None)


class ToolQueue:
    """The queue of one tool version at one pool: priority classes, tenants in turn, bounded
    batches in Triton."""

    def __init__(self, router: "Router", pool: Pool, tool: str, version: int = 1):
        self.router, self.pool, self.tool, self.version = router, pool, tool, version
        self.classes: list[OrderedDict[str, deque[Entry]]] = [OrderedDict() for _ in PRIORITY_NAMES]
        self.waiting = 0
        self.running = 0
        self.waited = False  # the current batch already waited for company
        settings = router.settings
        self.max_batch = settings.router_max_batch_size
        self.max_running = settings.router_max_concurrent_batches
        self.wait_s = settings.router_batch_wait_ms / 1000.0

    def put(self, entry: Entry) -> None:
        self.classes[entry.priority].setdefault(entry.context.tenant, deque()).append(entry)
        self.waiting += 1
        self.pool.queued[entry.priority] += 1
        if not entry.context.shadow:  # a shadow run is no tenant's load
            self.pool.hold(entry.context.tenant, 1)
        self.router.metrics.queue_depth[self.tool].inc()
        self.pump()

    def _take(self) -> list[Entry]:
        batch: list[Entry] = []
        for tenants in self.classes:
            while tenants and len(batch) < self.max_batch:
                tenant, entries = next(iter(tenants.items()))
                batch.append(entries.popleft())
                if entries:
                    tenants.move_to_end(tenant)  # the next image of this class comes from the next tenant
                else:
                    del tenants[tenant]
        for entry in batch:
            self.pool.queued[entry.priority] -= 1
        self.waiting -= len(batch)
        return batch

    def pump(self) -> None:
        while self.waiting and self.running < self.max_running:
            if self.running and self.waiting < self.max_batch and self.wait_s > 0 and not self.waited:
                # A batch is in Triton: wait a little for company (never at idle).
                self.waited = True
                asyncio.get_running_loop().call_later(self.wait_s, self._after_wait)
                return
            self.waited = False
            batch = self._take()
            self.running += 1
            asyncio.get_running_loop().create_task(self._run(batch))

    def _after_wait(self) -> None:
        if self.waited:
            self.waited = False
            if self.waiting and self.running < self.max_running:
                batch = self._take()
                self.running += 1
                asyncio.get_running_loop().create_task(self._run(batch))
            self.pump()

    async def _run(self, batch: list[Entry]) -> None:
        metrics = self.router.metrics
        started = time.perf_counter()
        metrics.queue_depth[self.tool].dec(len(batch))
        metrics.batch_size[self.tool].observe(len(batch))
        self.router.batch_sizes[self.tool].append(len(batch))
        for entry in batch:
            metrics.queue_seconds[self.tool].observe(started - entry.enqueued)
        try:
            groups: dict[tuple, list[Entry]] = {}
            for entry in batch:
                groups.setdefault(entry.image.shape, []).append(entry)
            await asyncio.gather(*(self.router.send(self.pool, self.tool, group, self.version)
                                   for group in groups.values()))
        finally:
            for entry in batch:
                if not entry.context.shadow:
                    self.pool.hold(entry.context.tenant, -1)
            self.running -= 1
            self.pump()


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
class Router:
    def __init__(self, settings: dict):
        import tritonclient.grpc.aio as grpcclient

        self.settings = Settings(**settings)
        self.grpc = grpcclient
        tools = self.settings.enabled_tools
        self.metrics = RouterMetrics(tools)
        self.pools: dict[str, Pool] = {}
        self.directory: PoolDirectory | None = None
        self.batch_sizes: dict[str, deque[int]] = {tool: deque(maxlen=10000) for tool in tools}
        self.requests: deque[float] = deque()  # routing decisions in the last WINDOW_S (retry budget)
        self.retries: deque[float] = deque()
        self.watcher = None
        if self.settings.pool_discovery == "kubernetes":
            self._start_discovery()
        else:
            self.apply_directory(directory_for(self.settings))
        self.metrics.registry.register(ReadinessCollector(self._pool_targets, model_of=self.settings.ensemble_of))
        self.metrics_port: int | None = None
        self._metrics_server = None
        if not self._serve_metrics():
            log.warning("router metrics: ports %d..%d are all taken; this replica tries again every probe round",
                        self.settings.router_metrics_port,
                        self.settings.router_metrics_port + self.settings.router_replicas - 1)
        self._prober: asyncio.Task | None = None
        self._probing: set[str] = set()  # pools probed out of turn (_probe_soon)
        self._http = None  # httpx.AsyncClient for Triton's metrics, made on the loop
        # Live tool versions (mosmedai.catalog.tool_config, from the gateway): what the pools must hold.
        self.live_versions: set[tuple[str, int]] = set()
        self.loaded_here: dict[tuple[str, str, int], float] = {}  # (pool, tool, version) we loaded -> when
        self.last_used: dict[tuple[str, int], float] = {}  # (tool, version) -> last image queued (monotonic)
        self._rounds = 0

    def _serve_metrics(self) -> bool:
        """Export metrics on a free port of the range, if not yet; whether it does."""
        if self.metrics_port is None:
            started = start_router_metrics_server(self.metrics, self.settings.bind_host,
                                                  self.settings.router_metrics_port, self.settings.router_replicas)
            if started is not None:
                self.metrics_port, self._metrics_server = started
        return self.metrics_port is not None

    def __del__(self) -> None:
        """Ray Serve calls this once the replica has drained: free the metrics port at once
        for the replica that replaces this one (the actor process lingers a little)."""
        server, self._metrics_server = getattr(self, "_metrics_server", None), None
        if server is not None:
            server.shutdown()
            server.server_close()

    # --- the pool directory -------------------------------------------------------------------
    def apply_directory(self, directory: PoolDirectory, ready: dict[str, int] | None = None) -> None:
        """Take a new directory: keep the state of pools whose endpoints are unchanged."""
        pools = {}
        for name, spec in directory.pools.items():
            pool = self.pools.get(name)
            if pool is None or pool.spec.endpoints != spec.endpoints:
                pool = Pool(spec, self.grpc)
            pool.spec = spec
            if ready is not None:
                pool.ready = ready.get(name, 0) > 0
            pools[name] = pool
        self.pools, self.directory = pools, directory
        self.metrics.known_pools(list(pools))
        log.info("pool directory: %s", ", ".join(f"{p.name} ({len(directory.tools_of(p.name))} tools)"
                                                 for p in pools.values()))

    def _start_discovery(self) -> None:
        """Watch GpuPools (a thread of the kubernetes client): each change is applied on the
        router's event loop, at the next probe round."""
        from mosmedai.serving.pool_discovery import PoolWatcher

        def changed(directory, ready):
            self._discovered = (directory, dict(ready))

        self._discovered = None
        self.watcher = PoolWatcher(self.settings.pool_namespace, self.settings.enabled_tools, changed).start()
        self.watcher.wait_synced(10.0)
        if self.watcher.directory() is not None:
            self.apply_directory(self.watcher.directory(), self.watcher.ready())

    def _apply_discovered(self) -> None:
        found, self._discovered = getattr(self, "_discovered", None), None
        if found is not None and found[0] is not self.directory:
            self.apply_directory(*found)

    def _pool_targets(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        directory = self.directory
        if directory is None:
            return {}
        return {name: (pool.endpoints[0], directory.tools_of(name)) for name, pool in directory.pools.items()}

    def _ensure_prober(self) -> None:
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    async def _probe_forever(self) -> None:
        while True:
            self._apply_discovered()
            self._serve_metrics()
            await asyncio.gather(*(self._probe(pool) for pool in list(self.pools.values())))
            self.metrics.observe_pools(self.pools.values())
            self._rounds += 1
            if self.live_versions and self._rounds % VERSION_CHECK_ROUNDS == 0:
                try:
                    await self._keep_versions()
                except Exception as error:  # a pool restarting: the next round tries again
                    log.warning("live versions: %s", error)
            await asyncio.sleep(self.settings.pool_probe_interval_s)

    def _probe_soon(self, pool: Pool) -> None:
        if pool.name not in self._probing:
            self._probing.add(pool.name)
            task = asyncio.get_running_loop().create_task(self._probe(pool))
            task.add_done_callback(lambda _: self._probing.discard(pool.name))

    async def _probe(self, pool: Pool) -> None:
        timeout = max(0.5, self.settings.pool_probe_interval_s)
        try:
            ready = await asyncio.wait_for(self._serves(pool), timeout)
        except Exception:
            ready = False
        if ready and pool.spec.metrics_url:
            pool.triton_pending = await self._pending(pool, timeout)
        if pool.ready != ready:
            log.warning("pool %s is %s", pool.name, "ready" if ready else "NOT ready")
        pool.ready = bool(ready)

    async def _serves(self, pool: Pool) -> bool:
        """Whether the pool's Triton serves: ready, or (its strict readiness is false while
        any model is missing) live with at least one of the pool's tools ready. A missing
        model is that tool's failure, not the pool's; a Triton that is exiting unloads every
        model first, and one that is starting has none ready yet."""
        client = pool.clients[0]
        if await client.is_server_ready():
            return True
        if not await client.is_server_live():
            return False
        for tool in (self.directory.tools_of(pool.name) if self.directory else ()):
            if tool in CATALOG and await client.is_model_ready(self.settings.ensemble_of(tool)):
                return True
        return False

    async def _pending(self, pool: Pool, timeout: float) -> float:
        """Requests waiting in the pool's Triton for its tools (``nv_inference_pending_request_count``
        of the ensembles), from its Prometheus endpoint; 0 when that does not answer."""
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(timeout=timeout)
        try:
            text = (await self._http.get(pool.spec.metrics_url)).text
        except httpx.HTTPError:
            return 0.0
        tools = {CATALOG[tool].ensemble(version) for tool in (self.directory.tools_of(pool.name) if self.directory else ())
                 if tool in CATALOG for version in CATALOG[tool].versions}
        pending = 0.0
        for line in text.splitlines():
            if line.startswith("nv_inference_pending_request_count{"):
                labels, _, value = line.rpartition(" ")
                model = labels.split('model="', 1)[-1].split('"', 1)[0]
                if model in tools:
                    pending += float(value)
        return pending

    async def check_health(self) -> None:
        """Serve calls this every few seconds: it keeps the readiness prober going."""
        self._ensure_prober()

    # --- routing and admission ------------------------------------------------------------------
    def _budget_ok(self) -> bool:
        """The retry budget: failover retries at most a fraction of the requests of the window."""
        now = time.monotonic()
        for times in (self.requests, self.retries):
            while times and times[0] < now - WINDOW_S:
                times.popleft()
        allowed = max(self.settings.retry_budget_min, self.settings.retry_budget_fraction * len(self.requests))
        return len(self.retries) < allowed

    def _decide(self, region: str, tool: str, context: StudyContext, priority: int,
                exclude: tuple[str, ...] = (), may_spill: bool = True) -> tuple[Pool | None, int, float]:
        """(pool, route, expected wait) for one tool of one study; (None, SHED, wait) to refuse."""
        names = self.directory.candidates(region, tool) if self.directory else ()
        pools = [self.pools[name] for name in names if name in self.pools]
        if not pools:
            return None, SHED, math.inf
        now = time.monotonic()
        up = [pool.up(now) and pool.name not in exclude for pool in pools]
        waits = [pool.expected_wait_s(priority) for pool in pools]
        transfer = [0.0] + [pool.spec.transfer_s for pool in pools[1:]]
        if context.synchronous:
            budget = context.remaining_s()
        else:
            budget = self.settings.time_to_result_slo_s
        # urgent work and accepted (asynchronous) work are never shed
        may_shed = context.synchronous and priority != URGENT
        choice, kind = route(up, waits, transfer, budget, self.settings.spill_wait_fraction, may_spill, may_shed)
        if choice < 0:
            return None, SHED, min((w for w, u in zip(waits, up) if u), default=math.inf)
        return pools[choice], kind, waits[choice]

    async def infer_image(self, tools: list[str], image: ImageInput | VolumeInput,
                          context: StudyContext, versions: dict[str, int] | None = None) -> dict[str, dict]:
        """Run every named tool on one image; tool -> outputs (with ``pool``, ``route`` and
        ``model_version``), or {'error', 'status', ...}. A study that cannot be admitted is
        refused whole, at once. ``versions`` picks a tool's version for this call (default:
        settings.tool_versions, else 1)."""
        self._ensure_prober()
        unknown = [tool for tool in tools if tool not in self.batch_sizes]
        if unknown:
            raise ValueError(f"tools not enabled on this router: {unknown}")
        chosen = {tool: (versions or {}).get(tool) or self.settings.tool_version(tool) for tool in tools}
        missing = [f"{tool} version {version}" for tool, version in chosen.items()
                   if version not in CATALOG[tool].versions]
        if missing:
            raise ValueError(f"no such tool versions: {missing}")
        self.requests.append(time.monotonic())
        plans = []
        for tool in tools:
            priority = len(PRIORITY_NAMES) - 1 if context.shadow else priority_of(CATALOG[tool])
            pool, kind, wait = self._decide(context.region, tool, context, priority)
            if pool is None:
                detail = (f"no pool of region {context.region} can run {tool} within the deadline "
                          f"({context.deadline_s:g} s; expected wait {wait:.1f} s)" if math.isfinite(wait)
                          else f"no pool that loads {tool} for region {context.region} is up")
                answer = refusal("overloaded", 503, detail, wait if math.isfinite(wait) else
                                 self.settings.pool_ejection_s)
                return {name: answer for name in tools}
            refused = self._fair_share(pool, context, priority, wait)
            if refused:
                return {name: refused for name in tools}
            plans.append((tool, priority, pool, kind))
        loop = asyncio.get_running_loop()
        futures = []
        for tool, priority, pool, kind in plans:
            future = loop.create_future()
            entry = Entry(tool, image, context, priority, home=self.directory.home(context.region, tool) or pool.name,
                          route=kind, future=future, version=chosen[tool])
            self._enqueue(pool, entry)
            futures.append(future)
        results = await asyncio.gather(*futures)
        return dict(zip(tools, results))

    def _fair_share(self, pool: Pool, context: StudyContext, priority: int, wait: float) -> dict | None:
        """429 for a tenant above its fair share of a contended pool (synchronous, not urgent).

        Contended: the pool's expected wait is past the spill threshold. A tenant's fair share
        is the images the pool can finish within the deadline, split evenly among the tenants
        with work there."""
        if not context.synchronous or priority == URGENT or context.shadow:
            return None
        budget = context.deadline_s
        if wait <= self.settings.spill_wait_fraction * budget:
            return None
        tenants = set(pool.tenant_load) | {context.tenant}
        if len(tenants) < 2:
            return None
        share = pool.throughput() * budget / len(tenants)
        held = pool.tenant_load.get(context.tenant, 0)
        if held < share:
            return None
        return refusal("fair_share", 429, f"tenant {context.tenant} holds {held} images at pool {pool.name}, "
                       f"its fair share is {share:.0f} while {len(tenants)} tenants wait there", wait)

    def _enqueue(self, pool: Pool, entry: Entry) -> None:
        key = (entry.tool, entry.version)
        self.last_used[key] = time.monotonic()
        queue = pool.queues.get(key)
        if queue is None:
            queue = pool.queues[key] = ToolQueue(self, pool, entry.tool, entry.version)
        queue.put(entry)

    async def send(self, pool: Pool, tool: str, entries: list[Entry], version: int = 1) -> None:
        """One Triton request (to the ensemble of the tool version) for images of equal shape;
        failures fail over or answer the entries."""
        grpc = self.grpc
        names = output_names(CATALOG[tool])
        ensemble = CATALOG[tool].ensemble(version)
        pool.in_flight += len(entries)
        pool.requests_in_flight += 1
        started = time.perf_counter()
        try:
            result = await pool.client().infer(
                ensemble, triton_inputs(grpc, [entry.image for entry in entries]),
                outputs=[grpc.InferRequestedOutput(name) for name in names],
                client_timeout=self.settings.triton_timeout_s)
        except Exception as error:
            status = _status_of(error)
            seconds = time.perf_counter() - started
            self.metrics.triton_seconds.labels(pool.name, tool).observe(seconds)
            self.metrics.triton_requests.labels(pool.name, tool, TRITON_OUTCOME.get(status, "error")).inc()
            if _pool_draining(error) and pool.ready:
                # A draining pool is out of rotation at once, not after pool_eject_after
                # answers: its readiness probe brings it back.
                pool.ready = False
                log.warning("pool %s is draining (Triton exiting): out of rotation until it is ready", pool.name)
            if _pool_unreachable(error) and pool.note_unavailable(self.settings):
                log.warning("pool %s ejected after %d UNAVAILABLE answers", pool.name, pool.failures)
            elif status == 503 and pool.ready:
                # Unavailable, yet answering (a draining Triton unloads its models first):
                # probe the pool now rather than at the next round.
                self._probe_soon(pool)
            log.warning("tool %s failed in pool %s: %s", tool, pool.name, error)
            for entry in entries:
                self._retry_or_fail(pool, entry, status, str(error))
            return
        finally:
            pool.in_flight -= len(entries)
            pool.requests_in_flight -= 1
        seconds = time.perf_counter() - started
        pool.note_success(len(entries), seconds)
        self.metrics.triton_seconds.labels(pool.name, tool).observe(seconds)
        self.metrics.triton_requests.labels(pool.name, tool, "ok").inc()
        values = {name: result.as_numpy(name) for name in names}
        for i, entry in enumerate(entries):
            self.metrics.routed.labels(pool.name, entry.home, tool, ROUTE_NAMES[entry.route]).inc()
            if not entry.future.done():
                entry.future.set_result({
                    "probability": float(values["probability"][i][0]),
                    "positive": bool(values["positive"][i][0]),
                    "location": [float(v) for v in values["location"][i]],
                    "measurements": [float(v) for v in values["measurements"][i]] if "measurements" in values else [],
                    # the tool version; Triton's answer names the ensemble's own version (always 1)
                    "model_version": str(version),
                    "triton_ms": seconds * 1000.0,
                    "batch_size": len(entries),
                    "pool": pool.name,
                    "route": ROUTE_NAMES[entry.route],
                })

    def _retry_or_fail(self, pool: Pool, entry: Entry, status: int, message: str) -> None:
        """A failed image: fail over to the next up pool (within the retry budget), else answer."""
        if entry.future.done():
            return
        tried = entry.tried + (pool.name,)
        if status == 503:
            attempts = len(tried)
            others, _, _ = self._decide(entry.context.region, entry.tool, entry.context, entry.priority,
                                        exclude=tried, may_spill=False)
            if others is None and attempts <= self.settings.triton_retries:
                # No other pool: the same pool once more after a pause (Triton restarting).
                others, tried = pool, entry.tried
            if others is not None:
                if not self._budget_ok():
                    entry.future.set_result(refusal("retry_budget", 503, f"{entry.tool}: pool {pool.name} failed "
                                                    f"and the retry budget is spent: {message}", 1.0))
                    return
                self.retries.append(time.monotonic())
                retried = Entry(entry.tool, entry.image, entry.context, entry.priority, entry.home,
                                FAILOVER if others.name != entry.home else entry.route, entry.future, tried=tried,
                                version=entry.version)
                delay = 0.2 * len(tried) if others is pool else 0.0
                asyncio.get_running_loop().call_later(delay, self._enqueue, others, retried)
                return
            entry.future.set_result({"error": f"no pool could run it for region {entry.context.region}: {message}",
                                     "status": 503, "retry_after_s": math.ceil(self.settings.pool_ejection_s)})
            return
        entry.future.set_result({"error": message, "status": status})

    # --- live versions (mosmedai.catalog.tool_config) ------------------------------------------------------
    async def load_versions(self, live: dict[str, list[int]]) -> dict[str, list[str]]:
        """Load every live tool version (``{tool: [versions]}``) in each up pool that serves the
        tool, with Triton's repository API (explicit model control), and wait until each is
        ready: the gateway switches to a configuration only after this returns. Raises naming
        the pool and ensemble when one cannot be loaded. A pool that is down now gets them when
        it is back (`_keep_versions`). Versions that this router loaded and that are live
        nowhere any more are unloaded once unused for ``tools_unload_grace_s``.
        Returns pool -> the ensembles loaded by this call."""
        self._ensure_prober()
        self.live_versions = {(tool, version) for tool, versions in live.items() if tool in CATALOG
                              for version in versions}
        return await self._keep_versions(strict=True)

    async def _keep_versions(self, strict: bool = False) -> dict[str, list[str]]:
        loaded: dict[str, list[str]] = {}
        problems = []
        now = time.monotonic()
        for pool in list(self.pools.values()):
            if not pool.up(now):
                continue
            tools = set(self.directory.tools_of(pool.name)) if self.directory else set()
            for tool, version in sorted(self.live_versions):
                if tool not in tools:
                    continue
                ensemble = CATALOG[tool].ensemble(version)
                for client in pool.clients:
                    try:
                        if await client.is_model_ready(ensemble):
                            continue
                        log.warning("pool %s: loading %s (tool %s version %s is live)", pool.name, ensemble,
                                    tool, version)
                        await client.load_model(ensemble)
                        if not await client.is_model_ready(ensemble):
                            raise RuntimeError("loaded, yet not ready")
                    except Exception as error:
                        problems.append(f"pool {pool.name}: {ensemble}: {error}")
                        continue
                    loaded.setdefault(pool.name, []).append(ensemble)
                    if version != self.settings.tool_version(tool):  # the base version is Triton's own
                        self.loaded_here[(pool.name, tool, version)] = now
        if problems and strict:
            raise RuntimeError("; ".join(problems))
        await self._unload_unused()
        return loaded

    async def _unload_unused(self) -> None:
        """Unload what this router loaded for an earlier configuration, once it is live nowhere
        and no image of it was queued for ``tools_unload_grace_s`` (gateway replicas re-read the
        file at their own pace; a study keeps the version it started with)."""
        now = time.monotonic()
        for (pool_name, tool, version), loaded_at in list(self.loaded_here.items()):
            if (tool, version) in self.live_versions:
                continue
            pool = self.pools.get(pool_name)
            queue = pool.queues.get((tool, version)) if pool else None
            busy = queue is not None and (queue.waiting or queue.running)
            idle_since = max(loaded_at, self.last_used.get((tool, version), 0.0))
            if busy or now - idle_since < self.settings.tools_unload_grace_s:
                continue
            if pool is not None:
                ensemble = CATALOG[tool].ensemble(version)
                try:
                    for client in pool.clients:
                        await client.unload_model(ensemble)
                except Exception as error:
                    log.warning("pool %s: unloading %s failed: %s", pool_name, ensemble, error)
                    continue
                log.warning("pool %s: unloaded %s (live nowhere since the configuration changed)", pool_name,
                            ensemble)
            del self.loaded_here[(pool_name, tool, version)]

    # --- what SREs and the gateway ask ------------------------------------------------------------
    async def pools_info(self) -> list[dict]:
        """Every pool: directory facts, state and load (no tenant data)."""
        self._ensure_prober()
        directory = self.directory
        return [{
            "name": pool.name,
            "regions": list(pool.spec.regions),
            "districts": list(pool.spec.districts),
            "endpoint": pool.spec.endpoints[0],
            "state": pool.state(),
            "tools": list(directory.tools_of(pool.name)),
            "neighbours": list(pool.spec.neighbours),
            "in_flight": pool.in_flight + sum(pool.queued),
            "expected_wait_s": round(pool.expected_wait_s(), 3),
        } for pool in self.pools.values()]

    async def ready(self) -> dict:
        """Whether each pool is ready, and each enabled tool ready on at least one pool."""
        self._ensure_prober()
        states: dict = {"pools": {}}
        tools_ready = {tool: False for tool in self.batch_sizes}
        for pool in self.pools.values():
            try:
                server = await asyncio.wait_for(pool.clients[0].is_server_ready(), 5.0)
                models = {tool: await pool.clients[0].is_model_ready(self.settings.ensemble_of(tool))
                          for tool in self.directory.tools_of(pool.name)} if server else {}
            except Exception as error:
                log.info("pool %s not ready: %s", pool.name, error)
                server, models = False, {}
            states["pools"][pool.name] = bool(server) and all(models.values())
            for tool, ready in models.items():
                tools_ready[tool] = tools_ready[tool] or bool(ready)
        states["triton"] = any(states["pools"].values())
        states.update(tools_ready)
        return states

    async def batch_stats(self) -> dict[str, dict[str, float]]:
        """Mean realised batch size per tool over the recent batches (for the benchmark)."""
        return {
            tool: {
                "batches": len(sizes),
                "images": int(sum(sizes)),
                "mean_batch_size": float(np.mean(sizes)) if sizes else 0.0,
            }
            for tool, sizes in self.batch_sizes.items()
        }

    async def reset_stats(self) -> None:
        for sizes in self.batch_sizes.values():
            sizes.clear()
