"""Answered studies: which tenant's studies the platform answered, and with which tool versions.

Feedback on a result (``mosmedai.results.feedback``) must know that the study is the caller's and
which Triton model version produced each tool's result. This module owns that record, one
small JSON object per (tenant, study) in the results bucket::

    answered/<tenant>/<study>.json
      {"tenant": ..., "study_instance_uid": ..., "updated_at": <epoch s>,
       "tools": {"<tool>": {"model_version": "1", "positive": true,
                            "categories": {"ct_category": "CT-2"}, "answered_at": <epoch s>}}}

The tenant is part of the key, so a lookup is one GET and one tenant can never read
another's record. Several answers of one study (its images sent one by one, a CT series
after a radiograph) are merged into the record by compare-and-swap (``If-Match``), so none
overwrites another; ``positive`` is true when any of the tool's answers on the study was.

Synchronous studies (``POST /v1/studies``, and the gRPC study service that calls it) are
recorded by `StudyRecordWriter`, a bounded background writer on the gateway's event loop:
the answer does not wait for the store. Pending records are coalesced per study, written a
few at a time, retried while the store fails, and flushed when the gateway shuts down. A
lookup sees this replica's pending records too, so feedback that arrives right after the
answer finds its study. When the buffer is full, the next answer waits for room
(back-pressure) rather than dropping a record.

Asynchronous studies (job API, STOW-RS, DIMSE) are already durable jobs with committed
results (``mosmedai.jobs.store``): a lookup that finds no record reads the tenant's done jobs of
the study and writes the record from them, so later lookups are one GET again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterable

from mosmedai.jobs.storage import ObjectStore, StorageError
from mosmedai.jobs.store import DONE, TENANT, UID, JobStore

log = logging.getLogger("mosmedai.results.answered")

#: A Triton model version as the platform labels it: digits; anything else is "unknown".
VERSION = re.compile(r"^[0-9]{1,12}$")


def version_label(version: str) -> str:
    return version if isinstance(version, str) and VERSION.match(version) else "unknown"


def record_key(tenant: str, study_uid: str) -> str:
    if not TENANT.match(tenant or "") or not UID.match(study_uid or "") or len(study_uid) > 64:
        raise ValueError(f"not a tenant id and study UID: {tenant!r}, {study_uid!r}")
    return f"answered/{tenant}/{study_uid}.json"


def tools_of(tool_results: Iterable[dict], at: float | None = None) -> dict[str, dict]:
    """What the record keeps of the tools' results (``ToolResult`` as JSON) of one study."""
    at = time.time() if at is None else at
    tools: dict[str, dict] = {}
    for result in tool_results:
        entry = {"model_version": version_label(str(result.get("model_version") or "")),
                 "positive": bool(result.get("findings")),
                 "categories": {m["name"]: m["label"] for m in result.get("measurements") or ()
                                if m.get("label") is not None},
                 "answered_at": at}
        tools[result["tool"]] = merge_tool(tools.get(result["tool"]), entry)
    return tools


def merge_tool(old: dict | None, new: dict) -> dict:
    """One tool's entry after another answer: the later version and categories; positive
    when any answer was."""
    if old is None:
        return dict(new)
    later, earlier = (new, old) if new["answered_at"] >= old["answered_at"] else (old, new)
    return {**later, "positive": bool(old["positive"] or new["positive"]),
            "categories": {**earlier.get("categories", {}), **later.get("categories", {})}}


def merge_tools(old: dict[str, dict], new: dict[str, dict]) -> dict[str, dict]:
    merged = dict(old)
    for tool, entry in new.items():
        merged[tool] = merge_tool(merged.get(tool), entry)
    return merged


class StudyRecords:
    """The records in the object store (blocking calls: run them in a thread).

    The records this instance last wrote are remembered with their ETags (``KNOWN`` of them),
    so the next answer of such a study - a mammogram's next view, a study sent again - is one
    conditional write, not a refused create, a read and a write. Another writer's change in
    between fails that write's ``If-Match``, and the merge reads the record as before."""

    #: how many written records (key -> ETag, record) an instance remembers
    KNOWN = 4096

    def __init__(self, store: ObjectStore, bucket: str, clock: Callable[[], float] = time.time):
        self.store, self.bucket, self.clock = store, bucket, clock
        self._known: OrderedDict[str, tuple[str, dict]] = OrderedDict()
        self._known_lock = threading.Lock()  # merges of different studies run in threads at once

    def _remember(self, key: str, etag: str, record: dict) -> None:
        with self._known_lock:
            self._known[key] = (etag, record)
            self._known.move_to_end(key)
            while len(self._known) > self.KNOWN:
                self._known.popitem(last=False)

    def _written(self, key: str) -> tuple[str, dict] | None:
        with self._known_lock:
            return self._known.pop(key, None)  # taken: a failed If-Match must not be tried again

    def get(self, tenant: str, study_uid: str) -> dict | None:
        data = self.store.get_optional(self.bucket, record_key(tenant, study_uid))
        return json.loads(data) if data is not None else None

    def merge(self, tenant: str, study_uid: str, tools: dict[str, dict]) -> dict:
        """Add these tools' answers to the study's record (compare-and-swap); returns it."""
        key = record_key(tenant, study_uid)
        written = self._written(key)
        if written is not None:  # this instance wrote it last: one write if nobody has since
            etag, current = written
            record = self._write(key, tenant, study_uid, merge_tools(current.get("tools", {}), tools), etag)
        else:
            # Most studies are answered once: create the record without reading it first (one
            # request, not a 404 and a write); only a study that has one already is merged.
            record = self._write(key, tenant, study_uid, tools, None)
        if record is not None:
            return record
        for _ in range(20):
            try:
                data, etag = self.store.get_with_etag(self.bucket, key)
                current = json.loads(data)
            except StorageError as exc:
                if exc.code not in ("NoSuchKey", "404", "NotFound"):
                    raise
                current, etag = None, None
            record = self._write(key, tenant, study_uid, merge_tools((current or {}).get("tools", {}), tools), etag)
            if record is not None:
                return record
        raise StorageError(f"answered study {study_uid} of {tenant}: too many concurrent updates",
                           bucket=self.bucket, key=key)

    def _write(self, key: str, tenant: str, study_uid: str, tools: dict[str, dict], etag: str | None) -> dict | None:
        """Write the record with these tools if the stored one still has ``etag`` (None: if
        there is none); the record, remembered with its new ETag, or None when refused."""
        record = {"tenant": tenant, "study_instance_uid": study_uid, "updated_at": self.clock(), "tools": tools}
        body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        if etag is None:
            new_etag = self.store.put(self.bucket, key, body, if_none_match=True, content_type="application/json")
        else:
            new_etag = self.store.put(self.bucket, key, body, if_match=etag, content_type="application/json")
        if new_etag is None:
            return None
        self._remember(key, new_etag, record)
        return record

    def from_jobs(self, jobs: JobStore, tenant: str, study_uid: str) -> dict | None:
        """The record of an asynchronous study, from the tenant's done jobs of it (then stored)."""
        tools: dict[str, dict] = {}
        for job in jobs.list_jobs(tenant, study_uid):
            if job.state != DONE:
                continue
            result = jobs.result(tenant, job.id) or {}
            answered = [tool for item in result.get("results", ()) for tool in item.get("tools", ())]
            tools = merge_tools(tools, tools_of(answered, at=job.finished_at or job.updated_at))
        if not tools:
            return None
        return self.merge(tenant, study_uid, tools)


class StudyRecordWriter:
    """Writes study records in the background of one gateway replica (see the module docstring).

    ``note`` is called on the answer's path: a dict merge, or a wait for room when
    ``max_pending`` studies are already waiting. ``flush`` waits until everything noted is
    stored (shutdown)."""

    def __init__(self, records: StudyRecords, jobs: JobStore | None = None, *, max_pending: int = 10000,
                 concurrency: int = 4, retry_s: float = 1.0):
        self.records, self.jobs = records, jobs
        self.max_pending, self.concurrency, self.retry_s = max_pending, concurrency, retry_s
        self._pending: dict[tuple[str, str], dict[str, dict]] = {}
        self._writing: dict[tuple[str, str], dict[str, dict]] = {}
        self._changed: asyncio.Event | None = None
        self._room: asyncio.Condition | None = None
        self._task: asyncio.Task | None = None

    def _start(self) -> None:
        if self._changed is None:
            self._changed, self._room = asyncio.Event(), asyncio.Condition()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._write_forever())

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._writing)

    async def note(self, tenant: str, study_uid: str, tools: dict[str, dict]) -> None:
        """Remember that the tenant's study was answered by these tools (written soon)."""
        if not tools:
            return
        try:
            record_key(tenant, study_uid)
        except ValueError as error:  # cannot be a key: there is nothing feedback could name either
            log.warning("answered study not recorded: %s", error)
            return
        self._start()
        key = (tenant, study_uid)
        if key not in self._pending and self.pending >= self.max_pending:
            async with self._room:
                await self._room.wait_for(lambda: key in self._pending or self.pending < self.max_pending)
        self._pending[key] = merge_tools(self._pending.get(key, {}), tools)
        self._changed.set()

    async def lookup(self, tenant: str, study_uid: str, tool: str | None = None) -> dict | None:
        """The study's record as this replica knows it: stored, merged with what is pending.
        When that has no record (or none of ``tool``), the study's done asynchronous jobs are
        read and recorded too."""
        stored = await asyncio.to_thread(self.records.get, tenant, study_uid)
        key = (tenant, study_uid)
        pending = merge_tools(self._writing.get(key, {}), self._pending.get(key, {}))
        known = {**(stored or {}).get("tools", {}), **pending}
        if self.jobs is not None and (not known or (tool is not None and tool not in known)):
            from_jobs = await asyncio.to_thread(self.records.from_jobs, self.jobs, tenant, study_uid)
            stored = from_jobs or stored
        if stored is None and not pending:
            return None
        record = stored or {"tenant": tenant, "study_instance_uid": study_uid}
        return {**record, "tools": merge_tools(record.get("tools", {}), pending)}

    async def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every noted record is stored; False when the time ran out."""
        if not self.pending:
            return True
        self._start()
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.pending:
            log.error("%d answered-study records not stored at shutdown (the store did not take them)",
                      self.pending)
        return not self.pending

    async def _write_forever(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            while self._pending:
                batch = []
                for key in list(self._pending)[:self.concurrency]:
                    self._writing[key] = merge_tools(self._writing.get(key, {}), self._pending.pop(key))
                    batch.append(key)
                outcomes = await asyncio.gather(*(asyncio.to_thread(self.records.merge, tenant, study,
                                                                    self._writing[(tenant, study)])
                                                  for tenant, study in batch), return_exceptions=True)
                failed = False
                for key, outcome in zip(batch, outcomes):
                    tools = self._writing.pop(key)
                    if isinstance(outcome, StorageError):
                        failed = True
                        log.warning("answered study %s of %s not stored yet (%s); retrying", key[1], key[0], outcome)
                        self._pending[key] = merge_tools(tools, self._pending.get(key, {}))
                    elif isinstance(outcome, BaseException):  # a bug, not the store: retrying would not help
                        log.error("answered study %s of %s not stored: %r", key[1], key[0], outcome)
                async with self._room:
                    self._room.notify_all()
                if failed:
                    await asyncio.sleep(self.retry_s)
