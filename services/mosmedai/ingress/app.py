"""The gateway: the platform's HTTP front door (FastAPI ingress of the Ray Serve app).

- ``POST /v1/studies``: one DICOM Part-10 file -> every enabled tool that reads it.
- ``POST /v1/studies/{uid}/feedback``: a radiologist's verdict on a tool's result
  (``mosmedai.results.feedback``); ``GET /v1/tools/{tool}/quality``: the tenant's feedback per version,
  and the agreement of versions run in shadow (``mosmedai.studies.shadow``) with the live one.
- ``GET /v1/tools``: every tool, its versions, and what is enabled and live for the caller
  (``mosmedai.catalog.tool_config``: per-region and per-tenant choice, re-read when its file changes).
- ``GET /healthz``, ``GET /readyz``; ``GET /metrics`` (Prometheus text format, not in OpenAPI).
- The Open Inference Protocol (KServe v2) REST endpoints for raw tensors, passed to
  Triton unchanged so a stock ``tritonclient.http`` client works, binary tensors included;
  only enabled tools are reachable.
"""


import asyncio
import functools
import logging
import math
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from mosmedai import __version__
from mosmedai.catalog import tool_config
from mosmedai.catalog.families import IMAGE
from mosmedai.catalog.regions import utc_offset_hours
from mosmedai.catalog.tools import CATALOG
from mosmedai.config import Settings
from mosmedai.ingress import dicomweb
from mosmedai.ingress.admission import AdmissionGate
from mosmedai.ingress.drain import DrainWatcher
from mosmedai.ingress.http_body import read_body
from mosmedai.ingress.metrics import (
    GatewayMetrics,
    gateway_metrics,
    install_gateway_metrics,
)
from mosmedai.ingress.tenants import install_registry, installed_registry, load_tenants
from mosmedai.jobs.store import DONE, FAILED, job_store
from mosmedai.jobs.store import UID as UID_PATTERN
from mosmedai.pipeline.errors import InputError, ToolsFailed
from mosmedai.pipeline.multipart import (
    DICOM_MEDIA_TYPE,
    MULTIPART_RELATED,
    multipart_body,
    multipart_parts,
)
from mosmedai.pipeline.work import (
    failures_of,
    infer_items,
    no_tool_error,
    prepare_off_loop,
)
from mosmedai.results import feedback
from mosmedai.results.answered import (
    StudyRecords,
    StudyRecordWriter,
    tools_of,
    version_label,
)
from mosmedai.results.findings import item_result
from mosmedai.results.schemas import (
    ErrorBody,
    Feedback,
    FeedbackIn,
    PoolsAnswer,
    StudyResult,
    StudyResults,
    StudyStatus,
    ToolQuality,
    ToolsAnswer,
)
from mosmedai.serving.pools import directory_for
from mosmedai.serving.router import Router, StudyContext
from mosmedai.serving.routing import URGENT, priority_of
from mosmedai.studies import shadow
from mosmedai.studies.runner import JobRunner, accept

log = logging.getLogger("mosmedai.ingress.app")


app = FastAPI(
    title="mosmedai gateway",
    version=__version__,
    description="Medical-imaging AI for regional hospitals: DICOM in, findings out. "
    "Reference models trained on synthetic data; not for clinical use.",
)


class RequestMetricsMiddleware:
    """Counts every answered request by route template, method and status (pure ASGI: no
    body buffering, one dict lookup and one histogram observation per request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        metrics = gateway_metrics()  # set by Gateway.__init__ (one gateway replica per process)
        if scope["type"] != "http" or metrics is None:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        code = 500

        async def send_and_note(message):
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics.observe_request(endpoint, scope["method"], code, time.perf_counter() - started)


#: Paths anyone may call: probes, metrics and the API description.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc",
                          "/docs/oauth2-redirect", "/v2/health/live", "/v2/health/ready"})


class TenantAuthMiddleware:
    """Every request outside PUBLIC_PATHS carries `Authorization: Bearer <token>` of a tenant;
    the tenant goes into the ASGI scope (``scope["mosmedai.tenant"]``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        tenants = installed_registry()
        if tenants is None:  # fail closed: no registry yet, nobody is let in
            answer = JSONResponse({"error": "not_ready", "detail": "the tenant registry is not loaded yet"}, 503)
            return await answer(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        tenant = tenants.by_token(token) if token else None
        if tenant is None:
            detail = ("an `Authorization: Bearer <token>` header is required" if token is None
                      else "the bearer token is not one of a tenant")
            answer = JSONResponse({"error": "unauthenticated", "detail": detail}, status_code=401,
                                  headers={"WWW-Authenticate": 'Bearer realm="mosmedai"'})
            return await answer(scope, receive, send)
        scope["mosmedai.tenant"] = tenant
        return await self.app(scope, receive, send)


def tenant_of(request: Request):
    return request.scope["mosmedai.tenant"]


app.add_middleware(TenantAuthMiddleware)
app.add_middleware(RequestMetricsMiddleware)
app.include_router(dicomweb.router)


@app.exception_handler(InputError)
async def _input_error(request: Request, error: InputError) -> JSONResponse:
    metrics = gateway_metrics()
    if metrics is not None:
        metrics.rejected_input(request.scope.get("mosmedai.tenant"), error.code)
    return JSONResponse(error.as_json(), status_code=error.status)


def check_study_uid(study_instance_uid: str) -> None:
    if not UID_PATTERN.match(study_instance_uid) or len(study_instance_uid) > 64:
        raise InputError(422, "invalid_uid", f"{study_instance_uid[:80]!r} is not a DICOM UID "
                         "(digits and dots, at most 64 characters)")


def not_visible(study_instance_uid: str, tenant) -> InputError:
    """Another tenant's study and a study that does not exist get this same answer."""
    return InputError(403, "forbidden", f"no study {study_instance_uid} is visible to tenant {tenant.id}")


def study_deadline_s(prefer: str, default_s: float) -> float:
    """The synchronous deadline: ``Prefer: wait=N`` (RFC 7240, seconds) may ask for less than
    the configured default, never more."""
    for token in prefer.split(","):
        name, _, value = token.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                seconds = -1.0
            if not 0 < seconds < 1e9:
                raise InputError(400, "bad_prefer_wait", f"Prefer: wait={value.strip()!r} is not a positive number of "
                                 "seconds (RFC 7240)")
            return min(seconds, default_s)
    return default_s


#: Retry-After of a study refused by a draining replica (s): another replica takes it at once.
DRAINING_RETRY_AFTER_S = 1
#: The client's connection is closed after the refusal: its next request opens one to a
#: replica that is not draining (a keep-alive connection would come back here).
DRAINING_HEADERS = {"Retry-After": str(DRAINING_RETRY_AFTER_S), "Connection": "close"}
#: Seconds of the graceful shutdown kept to give unfinished jobs back to the store.
GIVE_BACK_MARGIN_S = 2.0


# Ongoing requests are not the gateway's load limit (the admission gate is, and studies waiting
# in it cost nothing): a Ray Serve queue in front of the gate would hide waiting from it.
@serve.deployment(max_ongoing_requests=2048, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    def __init__(self, router: DeploymentHandle, settings: dict):
        self.router = router
        self.settings = Settings(**settings)
        self.triton = httpx.AsyncClient(base_url=self.settings.triton_http_base,
                                        timeout=self.settings.triton_timeout_s)
        self.tenants = load_tenants(self.settings.tenants_file or None, self.settings.profile,
                                    self.settings.demo_tenants)
        # A directory that leaves a tenant's region without a pool is refused at start.
        directory = None
        tenant_regions = {t.id: t.region for t in self.tenants.all()}
        if self.settings.pool_discovery == "config":
            directory = directory_for(self.settings)
            directory.check_regions(tenant_regions)
        self.metrics = GatewayMetrics(self.tenants.all(), self.settings.enabled_tools)
        install_gateway_metrics(self.metrics)
        self.jobs = job_store(self.settings)
        # Per-region tool choice: an invalid configuration is refused here, at start, and so is
        # a live version the admission gate has not admitted (its decisions are in the store).
        admitted = tool_config.admission_gate(self.jobs.store, self.settings.results_bucket)
        self.tool_choice = tool_config.ConfigWatcher(
            tool_config.source_path(self.settings.tools_config) if self.settings.tools_config.strip() else None,
            tool_config.load(self.settings, tenant_regions, directory, admitted),
            lambda text: tool_config.parse_text(text, self.settings, tenant_regions, directory, admitted),
            self._load_versions, self.settings.tools_config_poll_s, tool_config.ReloadMetrics(self.metrics.registry))
        install_registry(self.tenants)
        self.answered = StudyRecordWriter(StudyRecords(self.jobs.store, self.settings.results_bucket), self.jobs)
        self.feedback = feedback.FeedbackStore(self.jobs.store, self.settings.results_bucket)
        self.gate = AdmissionGate()
        # Whether a single image can be urgent work (an urgent tool that reads images).
        self._urgent_images = any(priority_of(CATALOG[tool]) == URGENT and CATALOG[tool].kind == IMAGE
                                  for tool in self.settings.enabled_tools)
        # Shadow runs of candidate versions (mosmedai.studies.shadow): after the live answer, in the background.
        self._live_calls, self._live_ended = 0, time.monotonic()  # live inference, for the shadow queue
        self.shadow = shadow.ShadowRunner(
            self._shadow_infer,
            lambda key, body: self.jobs.store.put(self.settings.results_bucket, key, body,
                                                  content_type="application/json"),
            shadow.ShadowMetrics(self.metrics.registry), quiet=self._live_quiet_s)
        self.runner = JobRunner(self.jobs, self.settings, self._infer_job, on_backlog=self._backlog,
                                choice=self._view_of_id, on_done=self._job_done)
        dicomweb.install(self.jobs, self.runner, self.settings, lambda tenant: self.view(tenant).enabled)
        # Graceful drain (mosmedai.ingress.drain): once Serve stops this replica, readiness is 503,
        # new synchronous studies get 503 `draining` with Retry-After, the job runner takes
        # no more jobs; __del__ gives the unfinished ones back to the store.
        self.drain = DrainWatcher(self.runner.drain)
        try:
            self._keep_going()
        except RuntimeError:  # no running loop in this constructor: the first request or check_health
            pass

    def _keep_going(self) -> None:
        """Start (once) the job runner and the drain watcher, on the replica's event loop."""
        self.drain.start()
        self.runner.start()
        self.tool_choice.start()

    async def _load_versions(self, choices: tool_config.ToolChoices) -> None:
        """Before a configuration is in force: its live versions are loaded on every pool."""
        await self.router.load_versions.remote(choices.live())

    def view(self, tenant) -> tool_config.ToolView:
        """The tools a tenant gets and their live versions, now (a study keeps the view it started with)."""
        return self.tool_choice.current.view_of(tenant)

    async def _shadow_infer(self, tenant_id: str, region: str, tool: str, version: int, tensors) -> dict:
        context = StudyContext(tenant_id, region, self.settings.time_to_result_slo_s, synchronous=False, shadow=True)
        outputs = await self.router.infer_image.remote([tool], tensors, context, {tool: version})
        return outputs[tool]

    def _job_done(self, tenant_id: str, view, items, item_results) -> None:
        tenant = self.tenants.get(tenant_id)
        if tenant is not None:
            self.shadow.offer(tenant, view, items, item_results)

    def _view_of_id(self, tenant_id: str) -> tool_config.ToolView | None:
        tenant = self.tenants.get(tenant_id)
        return None if tenant is None else self.view(tenant)

    @property
    def draining(self) -> bool:
        return self.drain.since is not None

    async def __del__(self) -> None:
        """Ray Serve calls this when the drain is over (no request in flight, servers closed),
        within graceful_shutdown_timeout_s of the stop: running jobs get what is left of that
        time to finish, less a margin to give back the others. First the answered-study
        records still pending are stored: they live only in this process, while an unfinished
        job is durable either way."""
        self.drain.drain()
        since = self.drain.since
        await self.answered.flush(timeout_s=max(1.0, self.settings.gateway_shutdown_s / 2 - (time.monotonic() - since)))
        left = self.settings.gateway_shutdown_s - (time.monotonic() - since) - GIVE_BACK_MARGIN_S
        released = await self.runner.stop(within_s=left)
        log.warning("gateway replica stopped: %d unfinished jobs given back", len(released))
        await self.triton.aclose()

    def _live_quiet_s(self) -> float:
        """Seconds since this replica's live inference last paused; 0 while some runs."""
        return 0.0 if self._live_calls else time.monotonic() - self._live_ended

    async def _infer(self, context: StudyContext, tools: list[str], tensors,
                     versions: dict[str, int] | None = None) -> dict:
        self._live_calls += 1
        try:
            outputs = await self.router.infer_image.remote(tools, tensors, context, versions or None)
        finally:
            self._live_calls -= 1
            self._live_ended = time.monotonic()
        for tool, out in outputs.items():
            if "model_version" in out:
                self.metrics.feedback_possible(context.region, tool, version_label(str(out["model_version"])))
        return outputs

    async def _infer_job(self, tenant_id: str, tools: list[str], tensors, versions: dict | None = None) -> dict:
        """An accepted (asynchronous) study's tools: routed by its tenant's region, never shed."""
        tenant = self.tenants.get(tenant_id)
        region = tenant.region if tenant is not None else "RU-MOW"
        context = StudyContext(tenant_id, region, self.settings.time_to_result_slo_s, synchronous=False)
        return await self._infer(context, tools, tensors, versions)

    def _backlog(self, per_tenant: dict[str, int]) -> None:
        per_region = {tenant.region: 0 for tenant in self.tenants.all()}
        for tenant_id, count in per_tenant.items():
            tenant = self.tenants.get(tenant_id)
            if tenant is not None:
                per_region[tenant.region] += count
        self.metrics.set_backlog(per_region)

    async def check_health(self) -> None:
        """Serve calls this every few seconds: it also keeps the job runner going."""
        self._keep_going()

    # --- health -------------------------------------------------------------------------
    @app.get("/healthz", summary="The gateway process is alive")
    async def healthz(self) -> dict:
        return {"status": "alive"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz", summary="Triton and every enabled tool are ready",
             responses={503: {"model": ErrorBody}})
    async def readyz(self) -> JSONResponse:
        self._keep_going()
        if self.draining:
            return JSONResponse({"error": "draining", "detail": "this gateway replica is shutting down"}, 503,
                                headers=DRAINING_HEADERS)
        if not self.tool_choice.prepared:
            return JSONResponse({"error": "not_ready", "detail": "the live tool versions are being loaded"}, 503)
        try:
            states = await asyncio.wait_for(self.router.ready.remote(), timeout=5.0)
        except Exception as error:  # router not up (yet)
            return JSONResponse({"error": "not_ready", "detail": f"router: {error}"}, status_code=503)
        not_ready = [name for name, ready in states.items() if not ready]
        if not states.get("triton"):
            return JSONResponse({"error": "not_ready", "detail": "Triton is not ready", "states": states}, 503)
        if not_ready:
            return JSONResponse(
                {"error": "not_ready", "detail": f"tools not ready: {', '.join(not_ready)}", "states": states}, 503
            )
        return JSONResponse({"status": "ready", "states": states})

    # --- study API ----------------------------------------------------------------------
    @app.post(
        "/v1/studies",
        response_model=StudyResult | StudyResults,
        summary="Run every enabled tool that reads these instances",
        description="Body: one DICOM Part-10 file (`Content-Type: application/dicom`; answer: StudyResult), "
        "or several (`multipart/related; type=\"application/dicom\"`, as DICOMweb STOW-RS; answer: "
        "StudyResults). Instances are grouped by series; CT tools read a whole series ordered by Image "
        "Position (Patient). Optional query `tools=a,b` restricts the run to those tools; `versions=a:2` runs "
        "version 2 of tool a instead of the deployment's (any version the tool has and Triton has loaded; "
        "`mosmedai tools admit` runs a candidate version this way; 409 when that version is not loaded).",
        responses={code: {"model": ErrorBody} for code in (400, 409, 413, 415, 422, 429, 502, 503, 504)},
        openapi_extra={"requestBody": {"required": True, "content": {
            DICOM_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            MULTIPART_RELATED: {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def submit_study(self, request: Request, tools: str | None = None,
                           versions: str | None = None) -> JSONResponse:
        received = time.perf_counter()
        tenant = tenant_of(request)
        self._keep_going()
        context = StudyContext(tenant.id, tenant.region,
                               study_deadline_s(request.headers.get("prefer", ""), self.settings.sync_deadline_s))
        view = self.view(tenant)  # the study keeps this view: its tools and their versions
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()
        if media_type not in (DICOM_MEDIA_TYPE, MULTIPART_RELATED):
            raise InputError(415, "unsupported_media_type",
                             f"Content-Type is '{media_type or '(none)'}'; send one DICOM file as {DICOM_MEDIA_TYPE} "
                             f"or several as {MULTIPART_RELATED}; type=\"{DICOM_MEDIA_TYPE}\"")
        wanted = None
        if tools:
            wanted = [name.strip() for name in tools.split(",") if name.strip()]
            unknown = [name for name in wanted if name not in view.enabled]
            if unknown:
                raise InputError(422, "unknown_tool", f"tools not enabled here: {unknown}; "
                                 f"enabled: {list(view.enabled)}")
        pinned = self._pinned_versions(versions, wanted, view) if versions else None
        if pinned:
            await self._pinned_loaded(pinned, view)
        asynchronous = "respond-async" in [token.strip().lower()
                                           for token in request.headers.get("prefer", "").split(",")]
        if asynchronous and (wanted is not None or pinned):
            raise InputError(422, "tools_with_async", "the `tools` and `versions` queries are not offered with "
                             "Prefer: respond-async: an accepted study runs every enabled tool that reads it")
        if self.draining and not asynchronous:
            # Refused at once, so the drain ends: another replica (pod) takes the retry. An
            # asynchronous study is still accepted: it is durable once accepted, and another
            # replica's runner runs it.
            self.metrics.shed_study(tenant, "draining")
            return JSONResponse({"error": "draining", "detail": "this gateway replica is shutting down; "
                                 "send the study again", "retry_after_s": DRAINING_RETRY_AFTER_S}, 503,
                                headers=DRAINING_HEADERS)
        admitted = None  # when the gate let the study in; its slot is given back when answered
        answers: list = []
        try:
            if media_type == DICOM_MEDIA_TYPE and not asynchronous and not self._urgent_images:
                # One image cannot be urgent work (urgent tools read series): judge it before
                # reading the body, the cheapest refusal there is.
                refused = await self._admit(tenant, context, urgent=False)
                if refused is not None:
                    return refused
                admitted = time.monotonic()
            body = await read_body(request, self.settings.max_body_bytes)
            read = time.perf_counter()
            if media_type == DICOM_MEDIA_TYPE:
                bodies = [body]
            else:
                bodies = self._instances(multipart_parts(body, content_type))
            images, items, unmatched = await prepare_off_loop(bodies, self.settings, wanted, view.enabled)
            if not items:
                raise no_tool_error(len(bodies), unmatched, list(view.enabled))
            if asynchronous:
                return await self._accept(tenant_of(request), bodies, images, request.headers.get("idempotency-key"))
            decoded = time.perf_counter()
            if admitted is None:
                # The first hop refuses what the platform cannot serve, before any routing.
                urgent = any(priority_of(CATALOG[tool]) == URGENT for item in items for tool in item.tools)
                refused = await self._admit(tenant, context, urgent)
                if refused is not None:
                    return refused
                admitted = time.monotonic()
            answers = await infer_items(functools.partial(self._infer, context,
                                                          versions={**view.versions, **(pinned or {})}), items)
        finally:
            if admitted is not None:
                self.gate.leave(tenant.id, admitted, answered=bool(answers) and not failures_of(answers))
        finished = time.perf_counter()
        failures = failures_of(answers)
        for item, outputs in zip(items, answers):
            outcomes = {tool: "failed" if "error" in out else ("positive" if out["positive"] else "negative")
                        for tool, out in outputs.items()}
            if failures:
                self.metrics.image_failed(tenant, item.first.facts.modality, outcomes)
            else:
                acquired = item.first.acquired_at
                # DICOM times without a zone are the tenant region's local time.
                utc_offset_s = utc_offset_hours(tenant.region) * 3600.0
                self.metrics.image_done(
                    tenant, item.first.facts.modality, item.first.study_instance_uid, outcomes, finished - received,
                    None if acquired is None else time.time() - (acquired.timestamp() - utc_offset_s))
        if failures:
            failed = ToolsFailed(failures)
            if failed.reason:
                self.metrics.shed_study(tenant, failed.reason)
            return JSONResponse(failed.as_json(), failed.status, headers=failed.headers())

        timings = {
            "receive": (read - received) * 1000.0,
            "decode": (decoded - read) * 1000.0,
            "inference": (finished - decoded) * 1000.0,
            "triton": max(out["triton_ms"] for outputs in answers for out in outputs.values()),
            "total": (finished - received) * 1000.0,
        }
        results = [item_result(item, outputs) for item, outputs in zip(items, answers)]
        # The live answer is decided: candidate versions may now run in shadow (never waited for).
        self.shadow.offer(tenant, view, items, results)
        await self._note_answered(tenant, items, results)
        if media_type == DICOM_MEDIA_TYPE:
            image, = images
            result = StudyResult(
                study_instance_uid=image.study_instance_uid, series_instance_uid=image.series_instance_uid,
                sop_instance_uid=image.sop_instance_uid, modality=image.facts.modality,
                tools=results[0].tools, timings_ms=timings)
        else:
            result = StudyResults(study_instance_uid=images[0].study_instance_uid, results=results,
                                  timings_ms=timings)
        return JSONResponse(result.model_dump(mode="json"))

    def _pinned_versions(self, versions: str, wanted: list[str] | None, view) -> dict[str, int]:
        """The `versions` query (``tool:N[,tool:N]``) -> {tool: N}; InputError 422 naming the entry.
        Only the caller's enabled tools (its tool choice) may be pinned."""
        pinned: dict[str, int] = {}
        for entry in (part.strip() for part in versions.split(",")):
            if not entry:
                continue
            tool, _, number = entry.partition(":")
            if not (number.isascii() and number.isdigit() and len(number) <= 6):  # int() of 4,300+ digits raises
                raise InputError(422, "bad_versions", f"versions: {entry!r} is not TOOL:VERSION (e.g. cxr_opacity:2)")
            if tool not in view.enabled:
                raise InputError(422, "unknown_tool", f"versions: tool {tool!r} is not enabled here; "
                                 f"enabled: {list(view.enabled)}")
            if wanted is not None and tool not in wanted:
                raise InputError(422, "bad_versions", f"versions: {tool} is not among the tools of this call {wanted}")
            if int(number) not in CATALOG[tool].versions:
                raise InputError(422, "unknown_version", f"versions: tool {tool} has no version {number}; "
                                 f"its versions: {list(CATALOG[tool].versions)}")
            pinned[tool] = int(number)
        return pinned

    async def _pinned_loaded(self, pinned: dict[str, int], view) -> None:
        """InputError 409 when a chosen version that is not the deployment's has no ensemble
        ready in Triton: the router would answer 503 and retry, as for a model reloading."""
        for tool, version in pinned.items():
            if version == view.versions.get(tool):
                continue
            ensemble = CATALOG[tool].ensemble(version)
            try:
                ready = (await self.triton.get(f"/v2/models/{ensemble}/ready")).status_code == 200
            except httpx.HTTPError:
                ready = True  # Triton unreachable: the router's own failover and answer apply
            if not ready:
                raise InputError(409, "version_not_loaded", f"versions: {tool} version {version} (Triton ensemble "
                                 f"{ensemble}) is not loaded here; load it first")

    async def _note_answered(self, tenant, items, results) -> None:
        """Remember (in the background) which tool versions answered the tenant's studies."""
        studies: dict[str, list[dict]] = {}
        for item, result in zip(items, results):
            studies.setdefault(item.first.study_instance_uid, []).extend(
                tool.model_dump(mode="json") for tool in result.tools)
        for study_uid, tool_results in studies.items():
            await self.answered.note(tenant.id, study_uid, tools_of(tool_results))

    async def _admit(self, tenant, context: StudyContext, urgent: bool) -> JSONResponse | None:
        """None once the study may go on (the gate's ``leave`` is then due), or the refusal
        (503 overloaded, 429 fair_share) with Retry-After."""
        refused = await self.gate.admit(tenant.id, context.remaining_s(), urgent)
        if refused is None:
            return None
        reason, status, detail, retry_after_s = refused
        self.metrics.shed_study(tenant, reason)
        seconds = math.ceil(retry_after_s)
        return JSONResponse({"error": reason, "detail": detail, "retry_after_s": seconds}, status,
                            headers={"Retry-After": str(seconds)})

    def _instances(self, parts: list[tuple[str, bytes]]) -> list[bytes]:
        if len(parts) > self.settings.max_instances_per_request:
            raise InputError(413, "too_many_instances", f"{len(parts)} instances in one request; the limit is "
                             f"{self.settings.max_instances_per_request} (max_instances_per_request)")
        wrong = [index + 1 for index, (part_type, _) in enumerate(parts) if part_type != DICOM_MEDIA_TYPE]
        if wrong:
            raise InputError(415, "unsupported_media_type",
                             f"parts {wrong[:10]} are not {DICOM_MEDIA_TYPE}; every part must be one DICOM file")
        return [payload for _, payload in parts]

    # --- asynchronous studies -----------------------------------------------------------------
    async def _accept(self, tenant, bodies: list[bytes], images, idempotency_key: str | None) -> JSONResponse:
        job = await accept(self.jobs, self.runner, tenant.id, bodies, images, idempotency_key, source="http")
        return JSONResponse(self._status(job), status_code=202, headers={"Location": f"/v1/studies/{job.study_uid}"})

    def _status(self, job, results: dict | None = None) -> dict:
        status = {"study_instance_uid": job.study_uid, "status": job.state, "job_id": job.id}
        if job.state == FAILED:
            status["error"] = job.reason
        if results is not None:
            status["results"] = results
        return status

    async def _job(self, request: Request, study_instance_uid: str):
        """The tenant's latest job of that study; another tenant's study, or none, is 403 alike
        (a tenant cannot tell another's study from a study that does not exist)."""
        tenant = tenant_of(request)
        check_study_uid(study_instance_uid)
        job = await asyncio.to_thread(self.jobs.find_by_study, tenant.id, study_instance_uid)
        if job is None:
            raise not_visible(study_instance_uid, tenant)
        return job

    @app.get("/v1/studies/{study_instance_uid}", response_model=StudyStatus,
             summary="Status of an accepted study, and its results when done",
             responses={code: {"model": ErrorBody} for code in (401, 403)})
    async def study_status(self, study_instance_uid: str, request: Request) -> JSONResponse:
        job = await self._job(request, study_instance_uid)
        results = None
        if job.state == DONE:
            results = await asyncio.to_thread(self.jobs.result, job.tenant, job.id)
        return JSONResponse(self._status(job, results))

    async def _objects(self, request: Request, study_instance_uid: str, kind: str) -> Response:
        job = await self._job(request, study_instance_uid)
        if job.state != DONE:
            raise InputError(409, "not_done", f"study {study_instance_uid} is {job.state}"
                             + (f": {job.reason}" if job.reason else "; try again when it is done"))
        keys = await asyncio.to_thread(self.jobs.object_keys, job)
        names = sorted(name for name in keys if name.rsplit("/", 1)[-1].startswith(kind))
        payloads = await asyncio.gather(*(asyncio.to_thread(self.jobs.read, keys[name]) for name in names))
        if kind == "sr" and len(payloads) == 1:
            return Response(payloads[0], media_type=DICOM_MEDIA_TYPE)
        body, content_type = multipart_body(payloads)
        return Response(body, media_type=content_type)

    @app.get("/v1/studies/{study_instance_uid}/sr", summary="The DICOM SR (TID 1500) of a done study",
             response_class=Response, responses={code: {"model": ErrorBody} for code in (401, 403, 409)})
    async def study_sr(self, study_instance_uid: str, request: Request) -> Response:
        return await self._objects(request, study_instance_uid, "sr")

    @app.get("/v1/studies/{study_instance_uid}/sc",
             summary="The secondary-capture series of a done study (multipart/related)",
             response_class=Response, responses={code: {"model": ErrorBody} for code in (401, 403, 409)})
    async def study_sc(self, study_instance_uid: str, request: Request) -> Response:
        return await self._objects(request, study_instance_uid, "sc")

    # --- radiologists' feedback ------------------------------------------------------------
    @app.post(
        "/v1/studies/{study_instance_uid}/feedback", response_model=Feedback, status_code=201,
        summary="A radiologist's verdict on one tool's result for one of the tenant's studies",
        description="201 when stored; 200 with the stored feedback when the same reviewer sends the same "
        "verdict, reason and comment again (counted once per study, tool and reviewer); 409 when that "
        "reviewer already sent something else (the first answer stands). 403 for a study the tenant was "
        "not answered (another tenant's, or none); 422 naming the field for a bad body, or when the tool "
        "did not run on the study. `reason` is required with verdict `disagree`, null otherwise.",
        responses={200: {"model": Feedback}, **{code: {"model": ErrorBody} for code in (400, 403, 409, 413, 415, 422)}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": FeedbackIn.model_json_schema()}}}},
    )
    async def give_feedback(self, study_instance_uid: str, request: Request) -> JSONResponse:
        tenant = tenant_of(request)
        check_study_uid(study_instance_uid)
        media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise InputError(415, "unsupported_media_type", f"Content-Type is '{media_type}'; send the feedback "
                             "as application/json")
        entry = feedback.parse(await read_body(request, feedback.MAX_BODY_BYTES))
        if entry.tool not in self.settings.enabled_tools:
            raise InputError(422, "unknown_tool", f"field 'tool': {entry.tool[:80]!r} is not a tool enabled here; "
                             f"enabled: {self.settings.enabled_tools}", fields=["tool"])
        # Only after the study is known to be the tenant's does an answer depend on it.
        record = await self.answered.lookup(tenant.id, study_instance_uid, entry.tool)
        if record is None:
            raise not_visible(study_instance_uid, tenant)
        answered = record["tools"].get(entry.tool)
        if answered is None:
            raise InputError(422, "tool_not_run", f"field 'tool': {entry.tool} did not run on study "
                             f"{study_instance_uid}; tools that did: {sorted(record['tools'])}", fields=["tool"])
        stored, created = await asyncio.to_thread(self.feedback.submit, tenant.id, study_instance_uid, entry,
                                                  answered)
        if created:
            self.metrics.feedback_given(tenant, entry.tool, stored["model_version"], entry.verdict)
        return JSONResponse(stored, status_code=201 if created else 200)

    @app.get("/v1/tools/{tool}/quality", response_model=ToolQuality,
             summary="The tenant's feedback on a tool, per model version",
             description="Counts of the caller tenant's feedback on the tool per model version (in the "
             "tenant's region) and the disagreement rate; for a version that ran in shadow on the tenant's "
             "studies, its agreement with the live version (`shadow_agreement`).", responses={404: {"model": ErrorBody}})
    async def tool_quality(self, tool: str, request: Request) -> JSONResponse:
        tenant = tenant_of(request)
        if tool not in self.settings.enabled_tools:
            raise InputError(404, "unknown_tool", f"{tool[:80]!r} is not a tool enabled here; "
                             f"enabled: {self.settings.enabled_tools}")
        counts, records = await asyncio.gather(
            asyncio.to_thread(self.feedback.summary, tenant.id, tool),
            asyncio.to_thread(shadow.read_records, self.jobs.store, self.settings.results_bucket, tool, tenant.id))
        agreements = {version: figures for (version, region), figures in shadow.by_version_and_region(records).items()
                      if region == tenant.region}
        versions = [{"model_version": version, "region": tenant.region,
                     "feedback": counts.get(version) or feedback.no_feedback(),
                     "shadow_agreement": agreements.get(version)}
                    for version in sorted(set(counts) | set(agreements), key=lambda v: (len(v), v))]
        answer = ToolQuality(tool=tool, tenant=tenant.id, region=tenant.region, versions=versions,
                             shadow_agreement_status=shadow.AGREEMENT_STATUS)
        return JSONResponse(answer.model_dump(mode="json"))

    @app.get("/v1/tools", response_model=ToolsAnswer,
             summary="Every tool, its versions, and what is enabled and live for the caller",
             description="`versions`: what the catalog and model repository hold, each with its model card and "
             "held-out evaluation summary. `enabled` and `live_version`: for the caller tenant (its region's "
             "choice, or its own override; mosmedai.catalog.tool_config), as of now.")
    async def list_tools(self, request: Request) -> JSONResponse:
        tenant = tenant_of(request)
        view = self.view(tenant)
        tools = [{**tool_config.tool_versions_info(name, self.settings.model_repository),
                  "enabled": name in view.enabled, "live_version": view.versions.get(name),
                  "shadow": view.shadow[name].model_dump() if name in (view.shadow or {}) else None}
                 for name in CATALOG]
        answer = ToolsAnswer(tenant=tenant.id, region=tenant.region, tools=tools)
        return JSONResponse(answer.model_dump(mode="json"))

    # --- pools and router statistics (SREs, benchmarks) ------------------------------------
    @app.get("/v1/pools", response_model=PoolsAnswer, summary="The Triton pools, their state and load",
             description="Any tenant's token; shows no tenant data. `endpoint` is the pool's gRPC host:port.")
    async def pools(self) -> dict:
        return {"pools": await self.router.pools_info.remote()}

    @app.get("/v1/router/batches", summary="Realised batch sizes per tool since the last reset")
    async def router_batches(self) -> dict:
        return await self.router.batch_stats.remote()

    @app.post("/v1/router/batches/reset", summary="Start counting batches afresh")
    async def router_batches_reset(self) -> dict:
        await self.router.reset_stats.remote()
        return {"status": "reset"}

    # --- Open Inference Protocol (KServe v2) over REST --------------------------------
    async def _to_triton(self, request: Request, path: str) -> Response:
        # The body goes on as it came (compressed or not); answers come back uncompressed
        # (httpx decodes them), so Accept-Encoding is not passed on.
        headers = {key: value for key, value in request.headers.items()
                   if key.lower() in ("content-type", "inference-header-content-length", "content-encoding")}
        try:
            answer = await self.triton.request(request.method, path, content=await request.body(),
                                               headers=headers, params=request.query_params)
        except httpx.HTTPError as error:
            return JSONResponse({"error": f"Triton unreachable: {error}"}, status_code=503)
        passed = {key: value for key, value in answer.headers.items()
                  if key.lower() in ("content-type", "inference-header-content-length")}
        return Response(answer.content, status_code=answer.status_code, headers=passed)

    def _known(self, tool: str, request: Request) -> JSONResponse | None:
        enabled = self.view(tenant_of(request)).enabled
        if tool not in enabled:
            # KServe v2 error body: {"error": "..."}.
            return JSONResponse({"error": f"unknown model '{tool}'; enabled: {list(enabled)}"}, 404)
        return None

    def _live_ensemble(self, tool: str, request: Request) -> str:
        return CATALOG[tool].ensemble(self.view(tenant_of(request)).version(tool))

    @app.get("/v2", summary="OIP server metadata")
    async def oip_server(self) -> dict:
        return {"name": "mosmedai", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", summary="OIP server live")
    async def oip_live(self) -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready", summary="OIP server ready")
    async def oip_ready(self, request: Request) -> Response:
        answer = await self.readyz()
        return Response(status_code=answer.status_code)

    @app.api_route("/v2/models/{tool}", methods=["GET"], summary="OIP model metadata")
    async def oip_model(self, tool: str, request: Request) -> Response:
        return self._known(tool, request) or await self._to_triton(
            request, f"/v2/models/{self._live_ensemble(tool, request)}")

    @app.api_route("/v2/models/{tool}/{action}", methods=["GET", "POST"],
                   summary="OIP model ready / config / infer")
    async def oip_action(self, tool: str, action: str, request: Request) -> Response:
        if action not in ("ready", "config", "infer", "stats"):
            return JSONResponse({"error": f"unknown endpoint '{action}'"}, 404)
        return self._known(tool, request) or await self._to_triton(
            request, f"/v2/models/{self._live_ensemble(tool, request)}/{action}")

    @app.api_route("/v2/models/{tool}/versions/{version}/{action}", methods=["GET", "POST"],
                   summary="OIP versioned model ready / infer")
    async def oip_versioned(self, tool: str, version: str, action: str, request: Request) -> Response:
        if action not in ("ready", "config", "infer") or not (version.isascii() and version.isdigit()):
            return JSONResponse({"error": f"unknown endpoint '{version}/{action}'"}, 404)
        refused = self._known(tool, request)
        if refused:
            return refused
        if int(version) not in CATALOG[tool].versions:
            return JSONResponse({"error": f"model '{tool}' has no version {version}; versions: "
                                 f"{list(CATALOG[tool].versions)}"}, 404)
        # a tool version is its own ensemble (ToolSpec.ensemble), whose Triton version is 1
        return await self._to_triton(request, f"/v2/models/{CATALOG[tool].ensemble(int(version))}/versions/1/{action}")


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

