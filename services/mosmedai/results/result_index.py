"""The index of a tenant's result objects (its SR and secondary captures), derived from the job
store (the done jobs and their result object keys) and the objects' headers. Result objects
never change, so parsed headers are kept in an LRU keyed by object key, and a done job's object
keys likewise. DICOMweb's QIDO-RS and WADO-RS read it."""

from __future__ import annotations

import concurrent.futures
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset

from mosmedai.jobs.store import DONE, UID


@dataclass(frozen=True)
class ResultInstance:
    job_id: str
    created_at: float
    name: str
    key: str
    header: Dataset  # without Pixel Data

    @property
    def study(self) -> str:
        return str(self.header.get("StudyInstanceUID", ""))

    @property
    def series(self) -> str:
        return str(self.header.get("SeriesInstanceUID", ""))

    @property
    def sop(self) -> str:
        return str(self.header.get("SOPInstanceUID", ""))


class _LRU:
    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


class ResultIndex:
    """A tenant's result instances, from the job store; immutable things are cached."""

    def __init__(self, jobs, max_headers: int = 4096, max_jobs: int = 20000, threads: int = 8):
        self.jobs = jobs
        self.headers = _LRU(max_headers)  # object key -> header Dataset
        self.done = _LRU(max_jobs)  # (tenant, job id) -> (created_at, ((name, key), ...))
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="dicomweb-index")

    def _job_ids(self, tenant: str, study: str | None) -> list[str]:
        store, bucket = self.jobs.store, self.jobs.incoming
        if study is not None:
            return [key.rsplit("/", 1)[1] for key in store.list(bucket, f"study/{tenant}/{study}/")]
        return [key.rsplit("/", 1)[1][:-5] for key in store.list(bucket, f"jobs/{tenant}/") if key.endswith(".json")]

    def _done_objects(self, tenant: str, job_id: str):
        cached = self.done.get((tenant, job_id))
        if cached is not None:
            return cached
        job = self.jobs.get(tenant, job_id)
        if job is None or job.state != DONE:
            return None
        objects = tuple(sorted(self.jobs.object_keys(job).items()))
        entry = (job.created_at, objects)
        self.done.put((tenant, job_id), entry)
        return entry

    def header(self, key: str) -> Dataset:
        header = self.headers.get(key)
        if header is None:
            header = pydicom.dcmread(io.BytesIO(self.jobs.read(key)), stop_before_pixels=True)
            self.headers.put(key, header)
        return header

    def instances(self, tenant: str, study: str | None = None) -> list[ResultInstance]:
        """The tenant's result instances (of one study), oldest job first (blocking)."""
        if study is not None and (len(study) > 64 or not UID.match(study)):
            return []
        ids = self._job_ids(tenant, study)
        done = self.pool.map(lambda job_id: self._done_objects(tenant, job_id), ids)
        entries = [(job_id, entry) for job_id, entry in zip(ids, done) if entry is not None]
        entries.sort(key=lambda pair: (pair[1][0], pair[0]))
        wanted = [(job_id, created, name, key) for job_id, (created, objects) in entries
                  for name, key in objects if name.endswith(".dcm")]
        headers = list(self.pool.map(lambda row: self.header(row[3]), wanted))
        found = [ResultInstance(job_id, created, name, key, header)
                 for (job_id, created, name, key), header in zip(wanted, headers)]
        if study is not None:
            found = [instance for instance in found if instance.study == study]
        return found

    def read(self, key: str) -> bytes:
        return self.jobs.read(key)


