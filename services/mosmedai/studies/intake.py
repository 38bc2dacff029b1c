"""The durable intake every door shares: instances stored before a study counts as accepted,
and the job record written last (the moment of acceptance).

A study comes from one door, named by its ``Origin`` (as Orthanc tags each instance it stores
with a ``DicomInstanceOrigin``): the HTTP study API, DICOMweb STOW-RS, the gRPC study service, or
DIMSE, where instances arrive one by one and a series becomes a job once it has been quiet.
Nothing here needs the router: the DIMSE process runs an intake of its own, and any gateway
replica's job runner takes the jobs it creates.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from mosmedai.jobs.storage import StorageError
from mosmedai.jobs.store import Job, JobError, JobStore
from mosmedai.pipeline.errors import InputError

log = logging.getLogger("mosmedai.studies.intake")

#: The doors, as a job's ``source`` records them.
DOORS = ("http", "dicomweb", "grpc", "dimse")


@dataclass(frozen=True)
class Origin:
    """Which door a study came through, and from whom (for logs and, later, the audit trail)."""

    door: str  # one of DOORS
    address: str = ""  # the peer's host:port, where the door knows it
    ae_title: str = ""  # the calling AE title (DIMSE)

    def __post_init__(self):
        if self.door not in DOORS:
            raise ValueError(f"unknown door {self.door!r}; doors: {DOORS}")


class StudyIntake:
    """Stores what the doors accept: whole studies (``accept``), or DIMSE instances one at a
    time (``receive_instance``) that ``complete_quiet_series`` turns into jobs."""

    def __init__(self, jobs: JobStore):
        self.jobs = jobs

    async def accept(self, tenant: str, bodies: list[bytes], images, origin: Origin,
                     idempotency_key: str | None = None) -> Job:
        """Persist every instance, then the job record. Raises InputError: 422 for a bad
        submission, 503 when the store is unavailable (then nothing was accepted)."""
        studies = sorted({image.study_instance_uid for image in images})
        if len(studies) > 1:
            raise InputError(422, "mixed_studies", f"an asynchronous submission is one study; got {len(studies)}: "
                             f"{studies[:5]}", study_instance_uids=studies[:20])
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
            raise InputError(400, "bad_idempotency_key", "Idempotency-Key must be 1 to 200 characters")
        try:
            keys = await asyncio.gather(*(
                asyncio.to_thread(self.jobs.put_instance, tenant, body, image.study_instance_uid,
                                  image.series_instance_uid, image.sop_instance_uid)
                for body, image in zip(bodies, images)))
            job, _ = await asyncio.to_thread(
                self.jobs.create_job, tenant, keys, study_uid=studies[0],
                sop_uids=[image.sop_instance_uid for image in images], source=origin.door,
                idempotency_key=idempotency_key)
        except JobError as error:
            raise InputError(422, "invalid_submission", str(error)) from None
        except StorageError as error:
            log.warning("storage unavailable, study from %s not accepted: %s", origin.door, error)
            raise InputError(503, "storage_unavailable", "the study could not be stored and was NOT accepted; "
                             "try again") from None
        return job

    def receive_instance(self, tenant: str, part10: bytes, study_uid: str, series_uid: str, sop_uid: str,
                         origin: Origin) -> None:
        """One instance of a series still arriving (DIMSE C-STORE), stored durably before the
        sender hears success. Raises InputError 503 when the store is unavailable."""
        try:
            self.jobs.put_pending(tenant, part10, study_uid, series_uid, sop_uid)
        except Exception as error:  # StorageError and anything else on the way to the store
            log.error("instance %s of tenant %s from %s not stored: %s", sop_uid, tenant, origin.ae_title or
                      origin.door, error)
            raise InputError(503, "storage_unavailable", f"the instance could not be stored: {error}") from None

    def complete_quiet_series(self, quiet_s: float, reply_to_of, now: float | None = None) -> list[Job]:
        """Every pending series quiet for ``quiet_s`` becomes a job (``reply_to_of(series)``:
        where its results go back, or None). One failing series does not stop the others."""
        jobs = []
        for series in self.jobs.pending_series(quiet_s, now=now):
            try:
                jobs.append(self.jobs.job_from_pending(series, reply_to_of(series)))
            except Exception:
                log.exception("job for pending series %s of tenant %s not created", series.series_uid, series.tenant)
        return jobs
