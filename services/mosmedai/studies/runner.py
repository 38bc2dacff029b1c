"""Runs accepted jobs: instances from the object store -> tools -> results back to the store.

Each gateway replica runs one JobRunner. It takes the jobs its own API accepted at once,
and polls the store for the rest (DIMSE series, jobs of a replica that died, jobs that were
unfinished when the platform stopped): `make up` after a crash resumes every one of them.

A job ends exactly once (``JobStore.complete`` is a conditional write): ``done`` with the
results JSON, the DICOM SR and the secondary captures, or ``failed`` with the reason the
tenant sees. Tools that are unavailable (router restarting, Triton down) are retried with
backoff for most of the job's lease; bad input fails the job at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time

from mosmedai.config import Settings
from mosmedai.jobs.store import DONE, FAILED, Job, JobStore
from mosmedai.pipeline.errors import InputError, ToolsFailed
from mosmedai.pipeline.work import failures_of, infer_items, no_tool_error, prepare
from mosmedai.results.dicom_objects import study_objects
from mosmedai.results.findings import item_result
from mosmedai.results.schemas import StudyResults

log = logging.getLogger("mosmedai.studies.runner")

#: Longest wait between two tries of a job whose tools are unavailable (s).
MAX_RETRY_DELAY_S = 30.0


async def analyse(settings: Settings, infer, bodies: list[bytes], wanted: list[str] | None = None,
                  enabled=None):
    """Instances -> (StudyResults, work items). Raises InputError (bad input) or ToolsFailed.
    ``enabled``: the tenant's tools (default: every served tool)."""
    started = time.perf_counter()
    images, items, unmatched = await asyncio.to_thread(prepare, bodies, settings, wanted, enabled)
    if not items:
        raise no_tool_error(len(bodies), unmatched, list(settings.enabled_tools if enabled is None else enabled))
    decoded = time.perf_counter()
    answers = await infer_items(infer, items)
    failures = failures_of(answers)
    if failures:
        raise ToolsFailed(failures)
    finished = time.perf_counter()
    results = StudyResults(
        study_instance_uid=images[0].study_instance_uid,
        results=[item_result(item, outputs) for item, outputs in zip(items, answers)],
        timings_ms={"decode": (decoded - started) * 1000.0, "inference": (finished - decoded) * 1000.0,
                    "total": (finished - started) * 1000.0},
    )
    return results, items


class JobRunner:
    """Runs accepted jobs at the pools' pace: ``infer(tenant_id, tools, tensors)`` routes them
    as asynchronous work (never shed); ``on_backlog({tenant_id: unfinished jobs})`` hears the
    backlog at every poll."""

    def __init__(self, jobs: JobStore, settings: Settings, infer, on_backlog=None, choice=None, on_done=None):
        self.jobs, self.settings, self.infer, self.on_backlog = jobs, settings, infer, on_backlog
        # on_done(tenant id, view, items, item results): after a job's result is committed (shadow runs)
        self.on_done = on_done
        # tenant id -> its ToolView (mosmedai.catalog.tool_config): the tools it gets, their live versions
        self.choice = choice
        self.active: set[str] = set()
        self.slots = asyncio.Semaphore(settings.job_concurrency)
        self.polling: asyncio.Task | None = None
        self.draining = False
        self.tasks: dict[str, asyncio.Task] = {}  # job id -> its task
        self.claimed: dict[str, Job] = {}  # job id -> the job as claimed here (running, our lease)
        self.claiming = 0  # claims in flight (threads)
        self.lock = threading.Lock()

    def start(self) -> None:
        """Begin polling the store (idempotent; needs a running event loop)."""
        if self.draining:
            return
        if self.polling is None or self.polling.done():
            self.polling = asyncio.get_running_loop().create_task(self._poll_forever())

    def submit(self, job: Job) -> None:
        """Run the job here; a draining runner leaves it in the store for another runner."""
        if self.draining:
            return
        if job.id not in self.active and job.state not in (DONE, FAILED):
            self.active.add(job.id)
            self.tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job))

    def drain(self) -> None:
        """Take no more jobs (polling stops); the running ones go on."""
        self.draining = True
        if self.polling is not None:
            self.polling.cancel()

    async def stop(self, within_s: float) -> list[str]:
        """Drain, give the running jobs up to ``within_s`` to finish, then cancel the rest and
        give them back to the store (`JobStore.release`): any runner takes them at once.
        Returns the ids of the jobs given back."""
        self.drain()
        running = [task for task in self.tasks.values() if not task.done()]
        if running:
            await asyncio.wait(running, timeout=max(0.0, within_s))
        for task in list(self.tasks.values()):
            task.cancel()
        for task in list(self.tasks.values()):
            try:
                await task
            except BaseException:  # cancelled, or failed as it was cancelled
                pass
        settle = time.monotonic() + 5.0
        while self.claiming and time.monotonic() < settle:  # claims already in a thread
            await asyncio.sleep(0.05)
        released = []
        for job_id, job in list(self.claimed.items()):
            try:
                if await asyncio.to_thread(self.jobs.release, job) is not None:
                    released.append(job_id)
            except Exception as error:  # left running: its lease expires, then it is retried
                log.warning("job %s could not be given back: %s", job_id, error)
            self.claimed.pop(job_id, None)
        if released:
            log.warning("draining: %d unfinished jobs given back to the store: %s", len(released), released)
        return released

    async def _poll_forever(self) -> None:
        while True:
            try:
                now = time.time()
                unfinished = await asyncio.to_thread(self.jobs.unfinished)
                for job in unfinished:
                    if job.lease_until is None or job.lease_until <= now:
                        self.submit(job)
                if self.on_backlog is not None:
                    backlog: dict[str, int] = {}
                    for job in unfinished:
                        backlog[job.tenant] = backlog.get(job.tenant, 0) + 1
                    self.on_backlog(backlog)
            except Exception as error:  # the store may be restarting: try again next round
                log.warning("job poll failed: %s", error)
            await asyncio.sleep(self.settings.job_poll_s)

    async def _run(self, job: Job) -> None:
        try:
            async with self.slots:
                if self.draining:  # waited for a slot while the replica began to drain
                    return
                with self.lock:
                    self.claiming += 1  # the thread counts it down
                claimed = await asyncio.to_thread(self._claim, job)
                if claimed is None or claimed.state in (DONE, FAILED):
                    return
                await self._work(claimed)
                self.claimed.pop(job.id, None)
        except Exception:
            # Left unfinished: its lease expires and the next poll (here or elsewhere) retries it.
            self.claimed.pop(job.id, None)
            log.exception("job %s of %s: unexpected error; it will be retried", job.id, job.tenant)
        finally:
            # Cancelled by `stop`: the job stays in `claimed`, for `stop` to give back.
            self.active.discard(job.id)
            self.tasks.pop(job.id, None)

    def _claim(self, job: Job) -> Job | None:
        """`JobStore.claim` (in a thread), noting a claim at once: a task cancelled while its
        claim is in flight still leaves the job known to `stop`."""
        try:
            claimed = self.jobs.claim(job)
            if claimed is not None and claimed.state not in (DONE, FAILED):
                self.claimed[job.id] = claimed
            return claimed
        finally:
            with self.lock:
                self.claiming -= 1

    async def _work(self, job: Job) -> None:
        bodies = await asyncio.gather(*(asyncio.to_thread(self.jobs.read, key) for key in job.instance_keys))
        deadline = time.monotonic() + 0.8 * self.settings.job_lease_s
        delay = self.settings.job_retry_s
        while True:
            try:
                # One view per attempt: the attempt runs on the versions live when it starts.
                view = self.choice(job.tenant) if self.choice is not None else None
                infer = functools.partial(self.infer, job.tenant)
                if view is not None:
                    infer = functools.partial(self.infer, job.tenant, versions=view.versions)
                results, items = await analyse(self.settings, infer, list(bodies),
                                               enabled=None if view is None else view.enabled)
                break
            except InputError as error:
                await asyncio.to_thread(self.jobs.fail, job, f"{error.code}: {error.message}")
                return
            except Exception as error:  # tools unavailable: router restarting, Triton down
                transient = not isinstance(error, ToolsFailed) or error.transient
                if not transient or time.monotonic() + delay > deadline:
                    reason = error.detail if isinstance(error, ToolsFailed) else f"{type(error).__name__}: {error}"
                    await asyncio.to_thread(self.jobs.fail, job, f"tool_failed: {reason}")
                    return
                log.info("job %s: tools unavailable (%s); retrying in %.0f s", job.id, error, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_RETRY_DELAY_S)
        objects = await asyncio.to_thread(study_objects, list(bodies), items, results)
        await asyncio.to_thread(self.jobs.complete, job, results.model_dump(mode="json"), objects)
        if self.on_done is not None and view is not None:
            self.on_done(job.tenant, view, items, results.results)
