"""Jobs: submissions of DICOM instances by a tenant, kept in S3 so that nothing accepted is lost.

A job is one submission (one or more instances). Its life: ``accepted`` (the job record is
written: the submission is accepted, and only then may the API/DIMSE say so) -> ``running``
(a runner claimed it under a lease) -> ``done`` (result committed) or ``failed`` (reason
visible to the tenant). A runner that dies leaves a running job whose lease expires; the
next `claim` takes it again (attempts += 1, at most `max_attempts`).

Storage layout (no database: JSON records and markers in the buckets):

incoming bucket
  instances/<tenant>/<study>/<series>/<sop>.dcm   identified originals (purged after retention)
  pending/<tenant>/<study>/<series>/<sop>         DIMSE instances not yet in a job (markers)
  jobs/<tenant>/<job>.json                        the job record (state machine, CAS by ETag)
  idem/<tenant>/<sha256(idempotency key)>         -> job id (create-only)
  study/<tenant>/<study>/<job>                    study index (written before the record)
  open/<tenant>/<job>                             unfinished jobs (removed when finished)
  finished/<tenant>/<job>                         finished, originals not yet purged
  deliver/<tenant>/<job>                          done with reply_to, not yet delivered
results bucket
  results/<tenant>/<job>/result.json              the commit record: result JSON + object keys
  results/<tenant>/<job>/<attempt>/<name>         result objects of that attempt
archive bucket
  archive/<tenant>/<job>/<n>.dcm                  de-identified copies (deid.py), kept

Exactly-once. The job id is derived from (tenant, set of SOP Instance UIDs), and the job
record is created with ``If-None-Match: *``: two submissions of the same instances are one
job. An idempotency key maps (create-only) to the job id of its first use. Completion
writes the result objects under an attempt-specific prefix, then the commit record
``result.json`` with ``If-None-Match: *``: exactly one completion wins, a second is a no-op
that returns the stored job, and a runner that crashed after committing is finalised by
the next `claim` instead of running the tools again. State updates of the record are
compare-and-swap on its ETag (``If-Match``). Both conditional writes are supported by AWS S3,
MinIO and moto; on a store that ignored them the guarantees would fall back to "one runner
per job at a time" (the lease).

De-identified archive copies are written when a job finishes (`complete` or `fail`), not at
acceptance: acceptance stays a plain S3 write on the DIMSE/HTTP request path (latency, and
an exotic object that trips the de-identifier must not make an accepted study fail), and
the runner already reads the instances. `purge_expired` deletes the originals only of
finished jobs, after the archive step has run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable

from mosmedai.jobs.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

ACCEPTED, RUNNING, DONE, FAILED = "accepted", "running", "done", "failed"
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TENANT = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
OBJECT_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")


class JobError(ValueError):
    """A request the job store refuses (bad identifiers, instances not persisted)."""


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    state: str
    source: str
    study_uid: str
    sop_uids: tuple[str, ...]
    instance_keys: tuple[str, ...]
    created_at: float
    updated_at: float
    idempotency_key: str | None = None
    reply_to: dict | None = None
    attempts: int = 0
    lease_until: float | None = None
    reason: str | None = None
    finished_at: float | None = None
    result_key: str | None = None
    object_names: tuple[str, ...] = ()
    archive_keys: tuple[str, ...] = ()
    archive_errors: tuple[str, ...] = ()
    delivery: dict | None = None  # {"state": "pending|delivered", "attempts", "next_at", "error"}
    purged_at: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        data = dict(data)
        for name in ("sop_uids", "instance_keys", "object_names", "archive_keys", "archive_errors"):
            data[name] = tuple(data.get(name) or ())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def public(self) -> dict:
        """What the tenant sees (no storage keys)."""
        return {"job_id": self.id, "state": self.state, "study_uid": self.study_uid,
                "instances": len(self.sop_uids), "source": self.source, "created_at": self.created_at,
                "updated_at": self.updated_at, "attempts": self.attempts, "reason": self.reason,
                "objects": list(self.object_names)}


@dataclass(frozen=True)
class PendingSeries:
    tenant: str
    study_uid: str
    series_uid: str
    keys: tuple[str, ...]  # instance keys (instances/...)
    last_arrival: float
    sop_uids: tuple[str, ...] = field(default=())


def _check_uid(name: str, value: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not UID.match(value):
        raise JobError(f"{name} {value!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return value


def _check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not TENANT.match(tenant):
        raise JobError(f"tenant {tenant!r} is not a tenant id")
    return tenant


def _dumps(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


class JobStore:
    """Jobs, their instances and results in S3 (see the module docstring)."""

    def __init__(self, store: ObjectStore, incoming_bucket: str, results_bucket: str, archive_bucket: str,
                 retention_s: float, *, lease_s: float = 300.0, max_attempts: int = 3,
                 deid_uid_secret: bytes = b"mosmedai-local",
                 deidentify: Callable[..., bytes] | None = None, clock: Callable[[], float] = time.time):
        self.store = store
        self.incoming, self.results, self.archive = incoming_bucket, results_bucket, archive_bucket
        self.retention_s = retention_s
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.deid_uid_secret = deid_uid_secret
        if deidentify is None:
            from mosmedai.jobs.deid import deidentify as deidentify_default

            deidentify = deidentify_default
        self._deidentify = deidentify
        self.clock = clock

    def ensure_buckets(self) -> None:
        self.store.ensure_buckets(self.incoming, self.results, self.archive)

    # --- instances ----------------------------------------------------------------------------
    @staticmethod
    def instance_key(tenant: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
        _check_tenant(tenant)
        _check_uid("StudyInstanceUID", study_uid)
        _check_uid("SeriesInstanceUID", series_uid)
        _check_uid("SOPInstanceUID", sop_uid)
        return f"instances/{tenant}/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def put_instance(self, tenant: str, part10: bytes, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Persist one identified instance; returns its key once the store acknowledged it."""
        key = self.instance_key(tenant, study_uid, series_uid, sop_uid)
        self.store.put(self.incoming, key, part10, content_type="application/dicom")
        return key

    def put_pending(self, tenant: str, part10: bytes, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Persist an instance that arrived by DIMSE before its series is complete (C-STORE may
        answer success once this returns). The instance first, then its pending marker."""
        key = self.put_instance(tenant, part10, study_uid, series_uid, sop_uid)
        marker = f"pending/{tenant}/{study_uid}/{series_uid}/{sop_uid}"
        self.store.put(self.incoming, marker, _dumps({"key": key, "at": self.clock()}))
        return key

    def pending_series(self, quiet_s: float, now: float | None = None) -> list[PendingSeries]:
        """Series with pending instances whose last instance arrived at least quiet_s ago."""
        now = self.clock() if now is None else now
        groups: dict[tuple[str, str, str], list] = {}
        for info in self.store.list_info(self.incoming, "pending/"):
            parts = info.key.split("/")
            if len(parts) != 5:
                continue
            _, tenant, study, series, sop = parts
            groups.setdefault((tenant, study, series), []).append((sop, info.last_modified))
        out = []
        for (tenant, study, series), items in sorted(groups.items()):
            last = max(t for _, t in items)
            if now - last < quiet_s:
                continue
            sops = tuple(sorted(s for s, _ in items))
            keys = tuple(self.instance_key(tenant, study, series, s) for s in sops)
            out.append(PendingSeries(tenant, study, series, keys, last, sops))
        return out

    def job_from_pending(self, series: PendingSeries, reply_to: dict | None) -> Job:
        """The job of a quiet pending series (idempotent), then clears its pending markers.

        A crash after the job is created and before the markers are gone leaves the markers:
        the next call finds the same SOP set (same job id) and returns the existing job. An
        instance that arrived late, after its series' job, forms a job of its own with only
        the instances that are in no job of that series yet.
        """
        sops = series.sop_uids or tuple(k.rsplit("/", 1)[1][:-4] for k in series.keys)
        in_jobs: set[str] = set()
        for job in self.list_jobs(series.tenant, series.study_uid):
            if any(k.split("/")[3] == series.series_uid for k in job.instance_keys):
                in_jobs.update(job.sop_uids)
        fresh = tuple(s for s in sops if s not in in_jobs)
        job: Job | None = None
        if fresh:
            keys = tuple(self.instance_key(series.tenant, series.study_uid, series.series_uid, s) for s in fresh)
            job, _ = self.create_job(series.tenant, keys, study_uid=series.study_uid, sop_uids=fresh,
                                     source="dimse", reply_to=reply_to)
        else:  # all already in jobs (crash before cleanup): the job holding these instances
            for candidate in self.list_jobs(series.tenant, series.study_uid):
                if set(sops) & set(candidate.sop_uids):
                    job = candidate
        for sop in sops:
            self.store.delete(self.incoming, f"pending/{series.tenant}/{series.study_uid}/{series.series_uid}/{sop}")
        assert job is not None
        return job

    # --- jobs ---------------------------------------------------------------------------------
    @staticmethod
    def job_id_for(tenant: str, sop_uids: Iterable[str]) -> str:
        digest = hashlib.sha256(("\n".join([tenant, *sorted(set(sop_uids))])).encode()).digest()
        return str(uuid.UUID(bytes=digest[:16], version=4))

    def _record_key(self, tenant: str, job_id: str) -> str:
        return f"jobs/{tenant}/{job_id}.json"

    def create_job(self, tenant: str, instance_keys: Iterable[str], *, study_uid: str, sop_uids: Iterable[str],
                   source: str, idempotency_key: str | None = None,
                   reply_to: dict | None = None) -> tuple[Job, bool]:
        """Accept a submission: (job, True) when created, (existing job, False) when the tenant
        already submitted this idempotency key or this set of SOP Instance UIDs.

        The instances must already be persisted (put_instance); the job record, written last,
        is what makes the submission accepted. Raises StorageError, JobError.
        """
        _check_tenant(tenant)
        _check_uid("StudyInstanceUID", study_uid)
        keys = tuple(instance_keys)
        sops = tuple(_check_uid("SOPInstanceUID", s) for s in sop_uids)
        if not keys or len(set(sops)) != len(sops) or len(keys) != len(sops):
            raise JobError(f"a job needs one instance key per distinct SOP Instance UID "
                           f"({len(keys)} keys, {len(sops)} UIDs, {len(set(sops))} distinct)")
        for key in keys:
            if not key.startswith(f"instances/{tenant}/"):
                raise JobError(f"instance key {key!r} is not one of tenant {tenant!r}'s instances")

        idem_key = None
        job_id = self.job_id_for(tenant, sops)
        if idempotency_key is not None:
            idem_key = f"idem/{tenant}/{hashlib.sha256(idempotency_key.encode()).hexdigest()}"
            earlier = self.store.get_optional(self.incoming, idem_key)
            if earlier is not None:
                job_id = json.loads(earlier)["job_id"]
                existing = self.get(tenant, job_id)
                if existing is not None:
                    return existing, False
        existing = self.get(tenant, job_id)
        if existing is not None:
            if idem_key is not None:
                self.store.put(self.incoming, idem_key, _dumps({"job_id": job_id}), if_none_match=True)
            return existing, False

        missing = [k for k in keys if not self.store.exists(self.incoming, k)]
        if missing:
            raise JobError(f"{len(missing)} instance(s) not persisted, e.g. {missing[0]!r}")
        if idem_key is not None and self.store.put(self.incoming, idem_key, _dumps({"job_id": job_id}),
                                                   if_none_match=True) is None:
            # A concurrent submission with the same key won; use its job.
            job_id = json.loads(self.store.get(self.incoming, idem_key))["job_id"]
            existing = self.get(tenant, job_id)
            if existing is not None:
                return existing, False
        now = self.clock()
        job = Job(job_id, tenant, ACCEPTED, source, study_uid, sops, keys, now, now,
                  idempotency_key=idempotency_key, reply_to=reply_to)
        # Indexes before the record: a crash leaves a dangling index entry (ignored), never an
        # accepted job that unfinished()/find_by_study() cannot see.
        self.store.put(self.incoming, f"study/{tenant}/{study_uid}/{job_id}", b"")
        self.store.put(self.incoming, f"open/{tenant}/{job_id}", b"")
        if self.store.put(self.incoming, self._record_key(tenant, job_id), _dumps(job.to_dict()),
                          if_none_match=True, content_type="application/json") is None:
            existing = self.get(tenant, job_id)
            assert existing is not None
            return existing, False
        return job, True

    def _load(self, tenant: str, job_id: str) -> tuple[Job, str] | None:
        if not TENANT.match(tenant or "") or not JOB_ID.match(job_id or ""):
            return None
        try:
            data, etag = self.store.get_with_etag(self.incoming, self._record_key(tenant, job_id))
        except StorageError as exc:
            if exc.code in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return Job.from_dict(json.loads(data)), etag

    def get(self, tenant: str, job_id: str) -> Job | None:
        """The tenant's job, or None (also for another tenant's job id: no enumeration)."""
        loaded = self._load(tenant, job_id)
        return loaded[0] if loaded else None

    def _update(self, job: Job, change: Callable[[Job], Job | None]) -> Job:
        """Compare-and-swap loop on the job record; `change` returns None for "no change"."""
        for _ in range(20):
            loaded = self._load(job.tenant, job.id)
            if loaded is None:
                raise JobError(f"job {job.id} of tenant {job.tenant!r} does not exist")
            current, etag = loaded
            new = change(current)
            if new is None:
                return current
            new = replace(new, updated_at=self.clock())
            if self.store.put(self.incoming, self._record_key(job.tenant, job.id), _dumps(new.to_dict()),
                              if_match=etag, content_type="application/json") is not None:
                return new
        raise StorageError(f"job {job.id}: too many concurrent updates of its record",
                           bucket=self.incoming, key=self._record_key(job.tenant, job.id))

    def list_jobs(self, tenant: str, study_uid: str | None = None) -> list[Job]:
        """The tenant's jobs (of one study), oldest first."""
        _check_tenant(tenant)
        if study_uid is not None:
            _check_uid("StudyInstanceUID", study_uid)
            ids = [k.rsplit("/", 1)[1] for k in self.store.list(self.incoming, f"study/{tenant}/{study_uid}/")]
        else:
            ids = [k.rsplit("/", 1)[1][:-5] for k in self.store.list(self.incoming, f"jobs/{tenant}/")]
        jobs = [j for j in (self.get(tenant, i) for i in ids) if j is not None]
        return sorted(jobs, key=lambda j: (j.created_at, j.id))

    def find_by_study(self, tenant: str, study_uid: str) -> Job | None:
        """The tenant's latest job of this study."""
        jobs = self.list_jobs(tenant, study_uid)
        return jobs[-1] if jobs else None

    def _marked(self, prefix: str) -> list[Job]:
        jobs = []
        for key in self.store.list(self.incoming, prefix):
            parts = key.split("/")
            if len(parts) != 3:
                continue
            job = self.get(parts[1], parts[2])
            if job is not None:
                jobs.append(job)
        return sorted(jobs, key=lambda j: (j.created_at, j.id))

    def unfinished(self) -> list[Job]:
        """Jobs accepted or running (all tenants), oldest first: what a runner must finish."""
        jobs = []
        for job in self._marked("open/"):
            if job.state in (ACCEPTED, RUNNING):
                jobs.append(job)
            else:  # finished but the marker survived a crash
                self.store.delete(self.incoming, f"open/{job.tenant}/{job.id}")
        return jobs

    def claim(self, job: Job, now: float | None = None) -> Job | None:
        """Take the job to run: accepted, or running with an expired lease -> running with a new
        lease and attempts + 1. None when someone else holds it, it is finished, or it has used
        max_attempts (then it fails)."""
        now = self.clock() if now is None else now
        if self.store.exists(self.results, self._commit_key(job)):
            self._finalise_done(job)  # a runner committed and crashed before updating the record
            return None
        flags = {"claimed": False, "out_of_attempts": False}

        def change(current: Job) -> Job | None:
            flags["claimed"] = flags["out_of_attempts"] = False
            if current.state in (DONE, FAILED):
                return None
            if current.state == RUNNING and (current.lease_until or 0) > now:
                return None
            if current.attempts >= self.max_attempts:
                flags["out_of_attempts"] = True
                return None
            flags["claimed"] = True
            return replace(current, state=RUNNING, attempts=current.attempts + 1, lease_until=now + self.lease_s)

        try:
            after = self._update(job, change)
        except JobError:
            return None
        if flags["out_of_attempts"]:
            self.fail(after, f"gave up after {after.attempts} attempts (the runner stopped each time)")
            return None
        return after if flags["claimed"] else None

    def release(self, job: Job) -> Job | None:
        """Give back a job this runner claimed (``job`` as `claim` returned it) and did not
        finish, because the runner is draining: accepted again at once, for any runner to take
        without waiting for the lease, and the attempt does not count (it did not fail).
        None when the job is no longer ours (finished, or claimed anew after our lease)."""
        flags = {"released": False}

        def change(current: Job) -> Job | None:
            flags["released"] = False
            if current.state != RUNNING or current.lease_until != job.lease_until:
                return None
            flags["released"] = True
            return replace(current, state=ACCEPTED, lease_until=None, attempts=max(0, current.attempts - 1))

        try:
            after = self._update(job, change)
        except JobError:
            return None
        return after if flags["released"] else None

    # --- results ------------------------------------------------------------------------------
    def _commit_key(self, job: Job) -> str:
        return f"results/{job.tenant}/{job.id}/result.json"

    def complete(self, job: Job, result_json: dict, objects: dict[str, bytes]) -> Job:
        """Store the result and its named objects (e.g. "sr.dcm", "sc/1.dcm"); state done.
        Exactly once: if the job already has a result, nothing is written and the stored job
        is returned."""
        for name in objects:
            if not OBJECT_NAME.match(name) or ".." in name.split("/"):
                raise JobError(f"result object name {name!r} is not a relative path of [A-Za-z0-9._-]")
        current = self.get(job.tenant, job.id)
        if current is None:
            raise JobError(f"job {job.id} of tenant {job.tenant!r} does not exist")
        if current.state == DONE or self.store.exists(self.results, self._commit_key(job)):
            return self._finalise_done(current)
        attempt = f"a{current.attempts}-{uuid.uuid4().hex[:8]}"
        keys = {}
        for name, data in objects.items():
            key = f"results/{job.tenant}/{job.id}/{attempt}/{name}"
            self.store.put(self.results, key, data)
            keys[name] = key
        commit = {"job_id": job.id, "result": result_json, "objects": keys, "committed_at": self.clock()}
        if self.store.put(self.results, self._commit_key(job), _dumps(commit), if_none_match=True,
                          content_type="application/json") is None:
            for key in keys.values():  # another completion won; ours is garbage
                self.store.delete(self.results, key)
        return self._finalise_done(current)

    def _finalise_done(self, job: Job) -> Job:
        commit = json.loads(self.store.get(self.results, self._commit_key(job)))
        names = tuple(sorted(commit["objects"]))
        archived = self._archive(job)

        def change(current: Job) -> Job | None:
            if current.state == DONE:
                return None
            return replace(current, state=DONE, lease_until=None, reason=None, finished_at=self.clock(),
                           result_key=self._commit_key(job), object_names=names,
                           archive_keys=archived[0], archive_errors=archived[1],
                           delivery={"state": "pending", "attempts": 0, "next_at": 0.0, "error": None}
                           if current.reply_to else None)

        done = self._update(job, change)
        self._finished_markers(done)
        return done

    def fail(self, job: Job, reason: str) -> Job:
        """State failed with `reason` (shown to the tenant). A done job stays done."""
        archived = self._archive(job)

        def change(current: Job) -> Job | None:
            if current.state in (DONE, FAILED):
                return None
            return replace(current, state=FAILED, reason=str(reason)[:2000], lease_until=None,
                           finished_at=self.clock(), archive_keys=archived[0], archive_errors=archived[1])

        failed = self._update(job, change)
        self._finished_markers(failed)
        return failed

    def _finished_markers(self, job: Job) -> None:
        if job.state not in (DONE, FAILED):
            return
        self.store.put(self.incoming, f"finished/{job.tenant}/{job.id}", b"")
        if job.state == DONE and job.reply_to and (job.delivery or {}).get("state") != "delivered":
            self.store.put(self.incoming, f"deliver/{job.tenant}/{job.id}", b"")
        self.store.delete(self.incoming, f"open/{job.tenant}/{job.id}")

    def _archive(self, job: Job) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """De-identified copies of the job's instances in the archive bucket (idempotent)."""
        keys, errors = [], []
        for n, key in enumerate(job.instance_keys):
            target = f"archive/{job.tenant}/{job.id}/{n:05d}.dcm"
            try:
                if not self.store.exists(self.archive, target):
                    data = self.store.get_optional(self.incoming, key)
                    if data is None:
                        errors.append(f"{n}: original already purged")
                        continue
                    self.store.put(self.archive, target, self._deidentify(data, uid_secret=self.deid_uid_secret),
                                   content_type="application/dicom")
                keys.append(target)
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - the de-identifier failing on one object
                log.warning("job %s: instance %d not archived: %s", job.id, n, exc)
                errors.append(f"{n}: {type(exc).__name__}: {exc}"[:300])
        return tuple(keys), tuple(errors)

    def result(self, tenant: str, job_id: str) -> dict | None:
        """The result JSON of the tenant's done job, else None."""
        job = self.get(tenant, job_id)
        if job is None:
            return None
        data = self.store.get_optional(self.results, self._commit_key(job))
        return json.loads(data)["result"] if data is not None else None

    def object_keys(self, job: Job) -> dict[str, str]:
        """Result object name -> key (read it with `read`)."""
        data = self.store.get_optional(self.results, self._commit_key(job))
        return dict(json.loads(data)["objects"]) if data is not None else {}

    def read(self, key: str) -> bytes:
        """An object by key: instances/pending/... from the incoming bucket, results/... from
        the results bucket, archive/... from the archive bucket."""
        bucket = self.results if key.startswith("results/") else self.archive if key.startswith(
            "archive/") else self.incoming
        return self.store.get(bucket, key)

    # --- delivery (results C-STOREd back by DIMSE) ----------------------------------------------
    def undelivered(self, now: float | None = None) -> list[Job]:
        """Done jobs with reply_to whose (next) delivery attempt is due."""
        now = self.clock() if now is None else now
        due = []
        for job in self._marked("deliver/"):
            delivery = job.delivery or {}
            if job.state != DONE or not job.reply_to or delivery.get("state") == "delivered":
                self.store.delete(self.incoming, f"deliver/{job.tenant}/{job.id}")
            elif float(delivery.get("next_at") or 0.0) <= now:
                due.append(job)
        return due

    def delivery_failed(self, job: Job, error: str, retry_at: float) -> Job:
        def change(current: Job) -> Job:
            d = dict(current.delivery or {})
            return replace(current, delivery={"state": "pending", "attempts": int(d.get("attempts", 0)) + 1,
                                              "next_at": retry_at, "error": str(error)[:1000]})

        return self._update(job, change)

    def delivered(self, job: Job) -> Job:
        def change(current: Job) -> Job:
            d = dict(current.delivery or {})
            return replace(current, delivery={"state": "delivered", "attempts": int(d.get("attempts", 0)) + 1,
                                              "next_at": None, "error": None, "at": self.clock()})

        done = self._update(job, change)
        self.store.delete(self.incoming, f"deliver/{job.tenant}/{job.id}")
        return done

    # --- retention --------------------------------------------------------------------------------
    def purge_expired(self, now: float | None = None) -> int:
        """Delete the identified originals of jobs finished more than retention_s ago; the
        de-identified archive copies and the results stay. Returns the number of objects deleted."""
        now = self.clock() if now is None else now
        deleted = 0
        finished = self._marked("finished/")
        if not finished:
            return 0
        in_use = {key for job in self.unfinished() for key in job.instance_keys}
        for job in finished:
            if job.state not in (DONE, FAILED) or job.finished_at is None:
                continue
            if now - job.finished_at < self.retention_s:
                continue
            for key in job.instance_keys:
                if key in in_use:
                    continue  # also an instance of a job not finished yet (overlapping submissions)
                if self.store.exists(self.incoming, key):
                    self.store.delete(self.incoming, key)
                    deleted += 1
            self._update(job, lambda current: replace(current, purged_at=now))
            self.store.delete(self.incoming, f"finished/{job.tenant}/{job.id}")
        return deleted


# --- the stores of a deployment -------------------------------------------------------------
def object_store(settings):
    """The object store of the deployment's settings (mosmedai.config.Settings): S3 at
    ``s3_endpoint_url``, else the local one."""
    if settings.s3_endpoint_url:
        return ObjectStore(settings.s3_endpoint_url, settings.s3_region)
    return ObjectStore.local(settings.s3_endpoint)


def job_store(settings) -> JobStore:
    jobs = JobStore(object_store(settings), settings.incoming_bucket, settings.results_bucket,
                    settings.archive_bucket, settings.retention_s, lease_s=settings.job_lease_s,
                    max_attempts=settings.job_max_attempts, deid_uid_secret=settings.deid_uid_secret.encode())
    jobs.ensure_buckets()
    return jobs
