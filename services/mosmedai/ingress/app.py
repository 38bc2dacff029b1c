"""The gateway: one Ray Serve replica that hosts the platform's HTTP and gRPC doors over one
study service (``mosmedai.studies.service``), in front of the router deployment.

The HTTP app is assembled here from one FastAPI router per API: the study API
(``http_studies``), tools and feedback (``http_tools``), operations (``http_ops``: probes,
metrics, pools), the Open Inference Protocol (``http_oip``) and DICOMweb (``dicomweb``); the
domain errors map to answers in ``http_errors``. The gRPC door (``grpc_door``) starts with
the replica, on the same event loop, over the same study service.
"""

import asyncio
import logging
import time

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from mosmedai import __version__
from mosmedai.catalog import tool_config
from mosmedai.config import Settings
from mosmedai.ingress import dicomweb, http_oip, http_ops, http_studies, http_tools
from mosmedai.ingress.auth import RequestMetricsMiddleware, TenantAuthMiddleware, install_studies
from mosmedai.ingress.drain import DrainWatcher
from mosmedai.ingress.grpc_door import GrpcDoor
from mosmedai.ingress.http_errors import install_error_handlers
from mosmedai.ingress.metrics import GatewayMetrics, install_gateway_metrics
from mosmedai.ingress.tenants import install_registry, load_tenants
from mosmedai.jobs.store import job_store
from mosmedai.serving.pools import directory_for
from mosmedai.serving.router import Router
from mosmedai.studies.service import StudyService

log = logging.getLogger("mosmedai.ingress.app")

app = FastAPI(
    title="mosmedai gateway",
    version=__version__,
    description="Medical-imaging AI for regional hospitals: DICOM in, findings out. "
    "Reference models trained on synthetic data; not for clinical use.",
)
app.add_middleware(TenantAuthMiddleware)
app.add_middleware(RequestMetricsMiddleware)
install_error_handlers(app)
for api in (http_ops, http_studies, http_tools, http_oip, dicomweb):
    app.include_router(api.router)

#: Seconds of the graceful shutdown kept to give unfinished jobs back to the store.
GIVE_BACK_MARGIN_S = 2.0


def tool_choice_watcher(settings: Settings, tenant_regions: dict[str, str], directory, store, registry):
    """The per-region tool choice, re-read when its file changes. An invalid configuration is
    refused at start, and so is a live version the admission gate has not admitted."""
    admitted = tool_config.admission_gate(store, settings.results_bucket)

    def watcher(load_versions):
        return tool_config.ConfigWatcher(
            tool_config.source_path(settings.tools_config) if settings.tools_config.strip() else None,
            tool_config.load(settings, tenant_regions, directory, admitted),
            lambda text: tool_config.parse_text(text, settings, tenant_regions, directory, admitted),
            load_versions, settings.tools_config_poll_s, tool_config.ReloadMetrics(registry))
    return watcher


# Ongoing requests are not the gateway's load limit (the admission gate is, and studies waiting
# in it cost nothing): a Ray Serve queue in front of the gate would hide waiting from it.
@serve.deployment(max_ongoing_requests=2048, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    def __init__(self, router: DeploymentHandle, settings: dict):
        self.settings = Settings(**settings)
        tenants = load_tenants(self.settings.tenants_file or None, self.settings.profile, self.settings.demo_tenants)
        # A directory that leaves a tenant's region without a pool is refused at start.
        directory = None
        tenant_regions = {t.id: t.region for t in tenants.all()}
        if self.settings.pool_discovery == "config":
            directory = directory_for(self.settings)
            directory.check_regions(tenant_regions)
        metrics = GatewayMetrics(tenants.all(), self.settings.enabled_tools)
        install_gateway_metrics(metrics)
        jobs = job_store(self.settings)
        watcher = tool_choice_watcher(self.settings, tenant_regions, directory, jobs.store, metrics.registry)
        # Graceful drain (mosmedai.ingress.drain): once Serve stops this replica, readiness is 503,
        # new synchronous studies get 503 `draining` with Retry-After, the job runner takes no
        # more jobs and the gRPC door stops listening; __del__ gives unfinished jobs back.
        self.drain = DrainWatcher(self._on_drain)
        self.studies = StudyService(self.settings, tenants, jobs, router, metrics, watcher,
                                    draining=lambda: self.drain.since is not None)
        install_registry(tenants)
        self.grpc = GrpcDoor(self.studies, self.settings)
        self._grpc_started = False
        install_studies(self.studies, self._keep_going)
        try:
            self._keep_going()
        except RuntimeError:  # no running loop in this constructor: the first request or check_health
            pass

    def _keep_going(self) -> None:
        """Start (once) the drain watcher, the study service's background work and the gRPC door,
        on the replica's event loop."""
        self.drain.start()
        self.studies.start()
        if not self._grpc_started and self.drain.since is None:
            self._grpc_started = True
            self._grpc_start = asyncio.get_running_loop().create_task(self.grpc.start())

    def _on_drain(self) -> None:
        self.studies.runner.drain()
        asyncio.get_running_loop().create_task(self.grpc.stop(grace_s=self.settings.gateway_shutdown_s / 2))

    async def check_health(self) -> None:
        """Serve calls this every few seconds: it also keeps the background work going."""
        self._keep_going()

    async def __del__(self) -> None:
        """Ray Serve calls this when the drain is over (no request in flight, servers closed),
        within graceful_shutdown_timeout_s of the stop: running jobs get what is left of that
        time to finish, less a margin to give back the others. The answered-study records still
        pending are stored first: they live only in this process, while an unfinished job is
        durable either way."""
        self.drain.drain()
        left = self.settings.gateway_shutdown_s - (time.monotonic() - self.drain.since) - GIVE_BACK_MARGIN_S
        released = await self.studies.stop(within_s=left)
        await self.grpc.stop(grace_s=0)
        log.warning("gateway replica stopped: %d unfinished jobs given back", len(released))


def build_app(settings: Settings, versions: dict[str, str] | None = None):
    """The Ray Serve application: the gateway ingress in front of the router.

    Both drain within ``gateway_shutdown_s`` when Serve stops a replica (upgrade, scale-down,
    shutdown). ``versions`` ({"gateway": ..., "router": ...}) pins the deployments' versions:
    changing one rolls only that deployment (`mosmedai.local.processes.rollout`)."""
    values = settings.model_dump(mode="json")
    versions = versions or {}
    # A restart starts the new replica before the old one stops (as maxSurge: 1, maxUnavailable: 0).
    drain = {"graceful_shutdown_timeout_s": settings.gateway_shutdown_s,
             "graceful_shutdown_wait_loop_s": DRAIN_WAIT_LOOP_S, "max_surge_percent": 100}
    router = _versioned(Router, versions.get("router")).options(
        num_replicas=settings.router_replicas, **drain).bind(values)
    return _versioned(Gateway, versions.get("gateway")).options(
        num_replicas=settings.gateway_replicas, **drain).bind(router, values)


def _versioned(deployment, version: str | None):
    """The deployment with its code version pinned: Serve restarts its replicas only when it
    changes (by default every `serve.run` gets a random one, restarting every deployment).
    Serve's public `options` no longer takes a version; its internal form still does."""
    return deployment if version is None else deployment.options(version=version, _internal=True)


#: How often a stopping replica checks whether its requests are done (Serve's default is 2 s).
DRAIN_WAIT_LOOP_S = 0.5


def app_from_env(args: dict | None = None):
    """Application builder for a Serve config (KubeRay: ``import_path: mosmedai.ingress.app:app_from_env``).

    Settings come from the MOSMEDAI_* environment of the Ray pods; the config's ``args``
    override single fields (e.g. ``{"router_max_batch_size": 16}``).
    """
    return build_app(Settings(**(args or {})))

