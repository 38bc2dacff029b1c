"""The study service: one object per gateway replica that every door adapts to.

A door hands it a tenant, DICOM instances and ``StudyOptions`` (tools, pinned versions,
deadline, synchronous or not, idempotency key, origin) and gets back a ``StudyAnswer`` (the
results) or an accepted ``Job``; it raises only the domain errors of
``mosmedai.pipeline.errors``, which each door maps to its own protocol. The path of a study,
one way down: admission (``admission.AdmissionGate``) -> decode and plan
(``mosmedai.pipeline``) -> the router (``mosmedai.serving``) -> results and records
(``mosmedai.results``) -> the job store (``mosmedai.jobs``).

The service also answers what the doors read back: a study's status and result objects, the
tenant's tools and their quality, feedback, and the router's pools and batch statistics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from dataclasses import dataclass, field

import httpx

from mosmedai.catalog import tool_config
from mosmedai.catalog.families import IMAGE
from mosmedai.catalog.regions import utc_offset_hours
from mosmedai.catalog.tools import CATALOG
from mosmedai.config import Settings
from mosmedai.jobs.store import DONE, FAILED, UID
from mosmedai.pipeline.errors import InputError, Refused, ToolsFailed
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
from mosmedai.results.result_index import ResultIndex
from mosmedai.results.schemas import StudyResult, StudyResults
from mosmedai.serving.router import StudyContext
from mosmedai.serving.routing import URGENT, priority_of
from mosmedai.studies import shadow
from mosmedai.studies.admission import AdmissionGate
from mosmedai.studies.intake import Origin, StudyIntake
from mosmedai.studies.runner import JobRunner

log = logging.getLogger("mosmedai.studies.service")

#: Retry-After of a study refused by a draining replica (s): another replica takes it at once.
DRAINING_RETRY_AFTER_S = 1


@dataclass
class StudyOptions:
    """What a door asks of one study, besides its instances."""

    tools: list[str] | None = None  # only these tools (None: every enabled tool that reads it)
    versions: dict[str, int] | None = None  # pinned versions (tool -> N) instead of the live ones
    deadline_s: float | None = None  # synchronous deadline (s); None: settings.sync_deadline_s
    asynchronous: bool = False  # accept durably and answer with a job
    idempotency_key: str | None = None
    origin: Origin = field(default_factory=lambda: Origin("http"))


@dataclass
class StudyAnswer:
    """A synchronous study's results, with the decoded images they are of."""

    images: list
    items: list
    results: list  # ItemResult per work item
    timings_ms: dict[str, float]

    def single(self) -> StudyResult:
        """One image's answer (a single DICOM file sent alone)."""
        image, = self.images
        return StudyResult(study_instance_uid=image.study_instance_uid, series_instance_uid=image.series_instance_uid,
                           sop_instance_uid=image.sop_instance_uid, modality=image.facts.modality,
                           tools=self.results[0].tools, timings_ms=self.timings_ms)

    def all(self) -> StudyResults:
        return StudyResults(study_instance_uid=self.images[0].study_instance_uid, results=self.results,
                            timings_ms=self.timings_ms)


def check_study_uid(study_instance_uid: str) -> None:
    if not UID.match(study_instance_uid) or len(study_instance_uid) > 64:
        raise InputError(422, "invalid_uid", f"{study_instance_uid[:80]!r} is not a DICOM UID "
                         "(digits and dots, at most 64 characters)")


def not_visible(study_instance_uid: str, tenant) -> InputError:
    """Another tenant's study and a study that does not exist get this same answer."""
    return InputError(403, "forbidden", f"no study {study_instance_uid} is visible to tenant {tenant.id}")


def parse_versions(text: str) -> dict[str, int]:
    """``tool:N[,tool:N]`` -> {tool: N}; InputError 422 naming the entry (checked against the
    caller's tools by the service)."""
    pinned: dict[str, int] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        tool, _, number = entry.partition(":")
        if not (number.isascii() and number.isdigit() and len(number) <= 6):  # int() of 4,300+ digits raises
            raise InputError(422, "bad_versions", f"versions: {entry!r} is not TOOL:VERSION (e.g. cxr_opacity:2)")
        pinned[tool] = int(number)
    return pinned


def job_status(job, results: dict | None = None) -> dict:
    status = {"study_instance_uid": job.study_uid, "status": job.state, "job_id": job.id}
    if job.state == FAILED:
        status["error"] = job.reason
    if results is not None:
        status["results"] = results
    return status


class StudyTicket:
    """One study on its way through the service (``StudyService.study``): its tools and versions
    fixed at the start, its admission slot held from ``admit_early`` or ``run`` until the
    ticket closes."""

    def __init__(self, service: "StudyService", tenant, options: StudyOptions, view, wanted, pinned):
        self.service, self.tenant, self.options = service, tenant, options
        self.view, self.wanted, self.pinned = view, wanted, pinned
        self.received = time.perf_counter()
        self.context = StudyContext(tenant.id, tenant.region, options.deadline_s or service.settings.sync_deadline_s)
        self.admitted: float | None = None  # when the gate let the study in
        self.answered = False

    @property
    def may_admit_early(self) -> bool:
        """Whether a single image may be admitted before its body is read (the cheapest refusal
        there is): it cannot be urgent work unless an urgent tool reads images."""
        return not self.options.asynchronous and not self.service.urgent_images

    async def admit_early(self) -> None:
        """Admit a single, not yet read image as routine work; raises Refused."""
        await self.service._admit(self, urgent=False)

    async def run(self, bodies: list[bytes], read_at: float | None = None):
        """The instances -> StudyAnswer (synchronous) or the accepted Job. Raises InputError,
        ToolsFailed or Refused."""
        return await self.service._run(self, bodies, read_at or time.perf_counter())

    def close(self) -> None:
        if self.admitted is not None:
            self.service.gate.leave(self.tenant.id, self.admitted, answered=self.answered)
            self.admitted = None


class StudyService:
    """One per gateway replica; see the module docstring. ``router``: the router deployment's
    handle; ``metrics``: the replica's GatewayMetrics; ``draining()``: whether the replica stops."""

    def __init__(self, settings: Settings, tenants, jobs, router, metrics, tool_choice_source, draining=lambda: False):
        self.settings, self.tenants, self.jobs, self.router, self.metrics = settings, tenants, jobs, router, metrics
        self.draining = draining
        self.intake = StudyIntake(jobs)
        self.index = ResultIndex(jobs)  # the tenants' result objects (DICOMweb QIDO-RS, WADO-RS)
        self.triton = httpx.AsyncClient(base_url=settings.triton_http_base, timeout=settings.triton_timeout_s)
        self.tool_choice = tool_choice_source(self._load_versions)
        self.answered = StudyRecordWriter(StudyRecords(jobs.store, settings.results_bucket), jobs)
        self.feedback = feedback.FeedbackStore(jobs.store, settings.results_bucket)
        self.gate = AdmissionGate()
        # Whether a single image can be urgent work (an urgent tool that reads images).
        self.urgent_images = any(priority_of(CATALOG[tool]) == URGENT and CATALOG[tool].kind == IMAGE
                                 for tool in settings.enabled_tools)
        self._live_calls, self._live_ended = 0, time.monotonic()  # live inference, for the shadow queue
        self.shadow = shadow.ShadowRunner(
            self._shadow_infer,
            lambda key, body: jobs.store.put(settings.results_bucket, key, body, content_type="application/json"),
            shadow.ShadowMetrics(metrics.registry), quiet=self._live_quiet_s)
        self.runner = JobRunner(jobs, settings, self._infer_job, on_backlog=self._backlog,
                                choice=self._view_of_id, on_done=self._job_done)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start (once) the job runner and the tool-choice watcher; needs a running loop."""
        self.runner.start()
        self.tool_choice.start()

    async def stop(self, within_s: float) -> list[str]:
        """Store the pending answered-study records, give running jobs ``within_s`` to finish and
        the rest back to the store; returns the ids given back."""
        started = time.monotonic()
        await self.answered.flush(timeout_s=max(1.0, within_s / 2))
        released = await self.runner.stop(within_s=within_s - (time.monotonic() - started))
        await self.triton.aclose()
        return released

    def view(self, tenant) -> tool_config.ToolView:
        """The tools a tenant gets and their live versions, now (a study keeps the view it started with)."""
        return self.tool_choice.current.view_of(tenant)

    async def _load_versions(self, choices: tool_config.ToolChoices) -> None:
        """Before a configuration is in force: its live versions are loaded on every pool."""
        await self.router.load_versions.remote(choices.live())

    # --- inference ---------------------------------------------------------------------------
    def _live_quiet_s(self) -> float:
        """Seconds since this replica's live inference last paused; 0 while some runs."""
        return 0.0 if self._live_calls else time.monotonic() - self._live_ended

    async def _infer(self, context: StudyContext, tools: list[str], tensors, versions: dict[str, int] | None = None):
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

    async def _shadow_infer(self, tenant_id: str, region: str, tool: str, version: int, tensors) -> dict:
        context = StudyContext(tenant_id, region, self.settings.time_to_result_slo_s, synchronous=False, shadow=True)
        outputs = await self.router.infer_image.remote([tool], tensors, context, {tool: version})
        return outputs[tool]

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

    def _job_done(self, tenant_id: str, view, items, item_results) -> None:
        tenant = self.tenants.get(tenant_id)
        if tenant is not None:
            self.shadow.offer(tenant, view, items, item_results)

    def _view_of_id(self, tenant_id: str) -> tool_config.ToolView | None:
        tenant = self.tenants.get(tenant_id)
        return None if tenant is None else self.view(tenant)

    # --- studies -----------------------------------------------------------------------------
    def study(self, tenant, options: StudyOptions) -> "_TicketScope":
        """``async with service.study(tenant, options) as ticket``: the options checked against
        the tenant's tools now (InputError), a draining replica's refusal (Refused), and the
        admission slot given back when the block ends."""
        return _TicketScope(self, tenant, options)

    async def submit(self, tenant, bodies: list[bytes], options: StudyOptions):
        """A study whose instances are already in hand: StudyAnswer or the accepted Job."""
        async with self.study(tenant, options) as ticket:
            return await ticket.run(bodies)

    async def _open(self, tenant, options: StudyOptions) -> StudyTicket:
        self.start()
        view = self.view(tenant)
        wanted = None
        if options.tools is not None:
            wanted = list(options.tools)
            unknown = [name for name in wanted if name not in view.enabled]
            if unknown:
                raise InputError(422, "unknown_tool", f"tools not enabled here: {unknown}; "
                                 f"enabled: {list(view.enabled)}")
        pinned = self._check_pinned(options.versions, wanted, view) if options.versions else None
        if pinned:
            await self._pinned_loaded(pinned, view)
        if options.asynchronous and (wanted is not None or pinned):
            raise InputError(422, "tools_with_async", "the `tools` and `versions` queries are not offered with "
                             "Prefer: respond-async: an accepted study runs every enabled tool that reads it")
        if self.draining() and not options.asynchronous:
            # Refused at once, so the drain ends: another replica (pod) takes the retry. An
            # asynchronous study is still accepted: it is durable once accepted, and another
            # replica's runner runs it.
            self.metrics.shed_study(tenant, "draining")
            raise Refused(503, "draining", "this gateway replica is shutting down; send the study again",
                          DRAINING_RETRY_AFTER_S, close=True)
        return StudyTicket(self, tenant, options, view, wanted, pinned)

    def _check_pinned(self, versions: dict[str, int], wanted: list[str] | None, view) -> dict[str, int]:
        """Only the caller's enabled tools (its tool choice) may be pinned, to versions they have."""
        for tool, number in versions.items():
            if tool not in view.enabled:
                raise InputError(422, "unknown_tool", f"versions: tool {tool!r} is not enabled here; "
                                 f"enabled: {list(view.enabled)}")
            if wanted is not None and tool not in wanted:
                raise InputError(422, "bad_versions", f"versions: {tool} is not among the tools of this call {wanted}")
            if number not in CATALOG[tool].versions:
                raise InputError(422, "unknown_version", f"versions: tool {tool} has no version {number}; "
                                 f"its versions: {list(CATALOG[tool].versions)}")
        return dict(versions)

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

    async def _admit(self, ticket: StudyTicket, urgent: bool) -> None:
        """The gate lets the study in (its slot is then held by the ticket) or it is Refused
        (503 overloaded, 429 fair_share) with Retry-After."""
        refused = await self.gate.admit(ticket.tenant.id, ticket.context.remaining_s(), urgent)
        if refused is not None:
            reason, status, detail, retry_after_s = refused
            self.metrics.shed_study(ticket.tenant, reason)
            raise Refused(status, reason, detail, math.ceil(retry_after_s))
        ticket.admitted = time.monotonic()

    async def _run(self, ticket: StudyTicket, bodies: list[bytes], read: float):
        tenant, options, view = ticket.tenant, ticket.options, ticket.view
        images, items, unmatched = await prepare_off_loop(bodies, self.settings, ticket.wanted, view.enabled)
        if not items:
            raise no_tool_error(len(bodies), unmatched, list(view.enabled))
        if options.asynchronous:
            job = await self.intake.accept(tenant.id, bodies, images, options.origin, options.idempotency_key)
            self.runner.submit(job)
            return job
        decoded = time.perf_counter()
        if ticket.admitted is None:
            # The first hop refuses what the platform cannot serve, before any routing.
            await self._admit(ticket, urgent=any(priority_of(CATALOG[tool]) == URGENT
                                                 for item in items for tool in item.tools))
        infer = functools.partial(self._infer, ticket.context, versions={**view.versions, **(ticket.pinned or {})})
        answers = await infer_items(infer, items)
        failures = failures_of(answers)
        ticket.answered = bool(answers) and not failures
        ticket.close()
        finished = time.perf_counter()
        self._count_images(tenant, items, answers, failures, finished - ticket.received)
        if failures:
            failed = ToolsFailed(failures)
            if failed.reason:
                self.metrics.shed_study(tenant, failed.reason)
            raise failed
        timings = {
            "receive": (read - ticket.received) * 1000.0,
            "decode": (decoded - read) * 1000.0,
            "inference": (finished - decoded) * 1000.0,
            "triton": max(out["triton_ms"] for outputs in answers for out in outputs.values()),
            "total": (finished - ticket.received) * 1000.0,
        }
        results = [item_result(item, outputs) for item, outputs in zip(items, answers)]
        # The live answer is decided: candidate versions may now run in shadow (never waited for).
        self.shadow.offer(tenant, view, items, results)
        await self._note_answered(tenant, items, results)
        return StudyAnswer(images, items, results, timings)

    def _count_images(self, tenant, items, answers, failures, seconds: float) -> None:
        for item, outputs in zip(items, answers):
            outcomes = {tool: "failed" if "error" in out else ("positive" if out["positive"] else "negative")
                        for tool, out in outputs.items()}
            if failures:
                self.metrics.image_failed(tenant, item.first.facts.modality, outcomes)
                continue
            acquired = item.first.acquired_at
            # DICOM times without a zone are the tenant region's local time.
            utc_offset_s = utc_offset_hours(tenant.region) * 3600.0
            self.metrics.image_done(
                tenant, item.first.facts.modality, item.first.study_instance_uid, outcomes, seconds,
                None if acquired is None else time.time() - (acquired.timestamp() - utc_offset_s))

    async def _note_answered(self, tenant, items, results) -> None:
        """Remember (in the background) which tool versions answered the tenant's studies."""
        studies: dict[str, list[dict]] = {}
        for item, result in zip(items, results):
            studies.setdefault(item.first.study_instance_uid, []).extend(
                tool.model_dump(mode="json") for tool in result.tools)
        for study_uid, tool_results in studies.items():
            await self.answered.note(tenant.id, study_uid, tools_of(tool_results))

    async def accept_decoded(self, tenant, bodies: list[bytes], images, origin: Origin):
        """Instances already decoded and planned by their door (STOW-RS) -> the accepted Job."""
        job = await self.intake.accept(tenant.id, bodies, images, origin)
        self.runner.submit(job)
        return job

    def enabled(self, tenant) -> list[str]:
        return list(self.view(tenant).enabled)

    # --- reading back --------------------------------------------------------------------------
    async def job_of(self, tenant, study_instance_uid: str):
        """The tenant's latest job of that study; another tenant's study, or none, is 403 alike
        (a tenant cannot tell another's study from a study that does not exist)."""
        check_study_uid(study_instance_uid)
        job = await asyncio.to_thread(self.jobs.find_by_study, tenant.id, study_instance_uid)
        if job is None:
            raise not_visible(study_instance_uid, tenant)
        return job

    async def status(self, tenant, study_instance_uid: str) -> dict:
        job = await self.job_of(tenant, study_instance_uid)
        results = await asyncio.to_thread(self.jobs.result, job.tenant, job.id) if job.state == DONE else None
        return job_status(job, results)

    async def objects(self, tenant, study_instance_uid: str, kind: str) -> list[bytes]:
        """The result objects of a done study whose names start with ``kind`` (sr, sc), in name order."""
        job = await self.job_of(tenant, study_instance_uid)
        if job.state != DONE:
            raise InputError(409, "not_done", f"study {study_instance_uid} is {job.state}"
                             + (f": {job.reason}" if job.reason else "; try again when it is done"))
        keys = await asyncio.to_thread(self.jobs.object_keys, job)
        names = sorted(name for name in keys if name.rsplit("/", 1)[-1].startswith(kind))
        return list(await asyncio.gather(*(asyncio.to_thread(self.jobs.read, keys[name]) for name in names)))

    async def give_feedback(self, tenant, study_instance_uid: str, body: bytes) -> tuple[dict, bool]:
        """A radiologist's verdict (JSON body, ``results.feedback``) -> (the stored feedback, created)."""
        check_study_uid(study_instance_uid)
        entry = feedback.parse(body)
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
        stored, created = await asyncio.to_thread(self.feedback.submit, tenant.id, study_instance_uid, entry, answered)
        if created:
            self.metrics.feedback_given(tenant, entry.tool, stored["model_version"], entry.verdict)
        return stored, created

    async def tool_quality(self, tenant, tool: str) -> dict:
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
        return {"tool": tool, "tenant": tenant.id, "region": tenant.region, "versions": versions,
                "shadow_agreement_status": shadow.AGREEMENT_STATUS}

    def tools(self, tenant) -> list[dict]:
        view = self.view(tenant)
        return [{**tool_config.tool_versions_info(name, self.settings.model_repository),
                 "enabled": name in view.enabled, "live_version": view.versions.get(name),
                 "shadow": view.shadow[name].model_dump() if name in (view.shadow or {}) else None}
                for name in CATALOG]

    async def readiness(self) -> tuple[bool, dict]:
        """(ready, body): the live versions loaded, Triton and every enabled tool ready."""
        if not self.tool_choice.prepared:
            return False, {"error": "not_ready", "detail": "the live tool versions are being loaded"}
        try:
            states = await asyncio.wait_for(self.router.ready.remote(), timeout=5.0)
        except Exception as error:  # router not up (yet)
            return False, {"error": "not_ready", "detail": f"router: {error}"}
        not_ready = [name for name, ready in states.items() if not ready]
        if not states.get("triton"):
            return False, {"error": "not_ready", "detail": "Triton is not ready", "states": states}
        if not_ready:
            return False, {"error": "not_ready", "detail": f"tools not ready: {', '.join(not_ready)}", "states": states}
        return True, {"status": "ready", "states": states}


class _TicketScope:
    def __init__(self, service: StudyService, tenant, options: StudyOptions):
        self.service, self.tenant, self.options = service, tenant, options
        self.ticket: StudyTicket | None = None

    async def __aenter__(self) -> StudyTicket:
        self.ticket = await self.service._open(self.tenant, self.options)
        return self.ticket

    async def __aexit__(self, *exc) -> None:
        self.ticket.close()
