"""Jobs in S3 against a real local S3 server (moto, in a child process): exactly-once
acceptance and completion, tenant isolation, leases, DIMSE pending series, retention, the
de-identified archive, and the server's write log surviving a restart."""

import io
import itertools

import numpy as np
import psutil
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mosmedai.jobs.deid import deidentify
from mosmedai.jobs.store import ACCEPTED, DONE, FAILED, RUNNING, JobError, JobStore
from mosmedai.jobs import storage
from mosmedai.jobs.storage import ObjectStore, start_local_s3

_n = itertools.count()


@pytest.fixture(scope="module")
def s3():
    server = start_local_s3()
    yield server
    server.stop()


@pytest.fixture
def jobs(s3):
    i = next(_n)
    store = ObjectStore.local(s3.endpoint_url)
    js = JobStore(store, f"incoming-{i}", f"results-{i}", f"archive-{i}", retention_s=3600, lease_s=60,
                  max_attempts=3)
    js.ensure_buckets()
    return js


def part10(name="Ivanov^Ivan", pid="PID-123", study=None, series=None, sop=None) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = sop or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), series or generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, "19700101"
    ds.Modality, ds.StudyDate, ds.InstitutionName, ds.AccessionNumber = "DX", "20240101", "GKB 1", "ACC1"
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091010, "LO", "Ivanov private")
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def submit(js, tenant="demo-moscow", n=2, study=None, key=None, sops=None):
    study = study or generate_uid()
    series = generate_uid()
    sops = sops or [generate_uid() for _ in range(n)]
    keys = [js.put_instance(tenant, part10(study=study, series=series, sop=s), study, series, s) for s in sops]
    return js.create_job(tenant, keys, study_uid=study, sop_uids=sops, source="http", idempotency_key=key)


def test_create_job_idempotent_by_key_and_by_sop_uids(jobs):
    job, created = submit(jobs, key="req-1")
    assert created and job.state == "accepted" and len(job.sop_uids) == 2
    again, created = jobs.create_job(job.tenant, job.instance_keys, study_uid=job.study_uid,
                                     sop_uids=job.sop_uids, source="http")
    assert not created and again.id == job.id  # same SOP set, no key
    other, created = submit(jobs, key="req-1")  # same key, other instances
    assert not created and other.id == job.id
    assert len(jobs.list_jobs("demo-moscow")) == 1
    assert jobs.find_by_study("demo-moscow", job.study_uid).id == job.id
    assert [j.id for j in jobs.unfinished()] == [job.id]


def test_job_needs_persisted_instances(jobs):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    key = jobs.instance_key("demo-moscow", study, series, sop)
    with pytest.raises(JobError, match="not persisted"):
        jobs.create_job("demo-moscow", [key], study_uid=study, sop_uids=[sop], source="http")
    assert jobs.list_jobs("demo-moscow") == []
    with pytest.raises(JobError, match="not a DICOM UID"):
        jobs.put_instance("demo-moscow", b"x", study, series, "../../etc")


def test_other_tenant_cannot_see_job(jobs):
    job, _ = submit(jobs, tenant="demo-moscow")
    assert jobs.get("demo-moscow", job.id).id == job.id
    assert jobs.get("demo-tatarstan", job.id) is None
    assert jobs.result("demo-tatarstan", job.id) is None
    assert jobs.find_by_study("demo-tatarstan", job.study_uid) is None
    assert jobs.get("demo-moscow", "../x") is None
    # the same instances submitted by another tenant are that tenant's own job
    other, created = submit(jobs, tenant="demo-tatarstan", sops=list(job.sop_uids))
    assert created and other.id != job.id


def test_complete_twice_stores_once(jobs):
    job, _ = submit(jobs)
    running = jobs.claim(job)
    assert running.state == RUNNING and running.attempts == 1
    done = jobs.complete(running, {"findings": 1}, {"sr.dcm": b"SR1", "sc/1.dcm": b"SC1"})
    assert done.state == DONE and done.object_names == ("sc/1.dcm", "sr.dcm")
    again = jobs.complete(running, {"findings": 2}, {"sr.dcm": b"SR2"})
    assert again.state == DONE and jobs.result("demo-moscow", job.id) == {"findings": 1}
    keys = jobs.object_keys(done)
    assert jobs.read(keys["sr.dcm"]) == b"SR1" and jobs.read(keys["sc/1.dcm"]) == b"SC1"
    results = jobs.store.list(jobs.results, f"results/demo-moscow/{job.id}/")
    assert len(results) == 3  # result.json + two objects: the second completion left nothing
    assert jobs.unfinished() == [] and jobs.claim(done) is None
    assert jobs.fail(done, "late").state == DONE


def test_claim_lease_and_attempts(jobs):
    job, _ = submit(jobs)
    t0 = 1_000_000.0
    first = jobs.claim(job, now=t0)
    assert first and first.attempts == 1
    assert jobs.claim(job, now=t0 + 10) is None  # lease held
    assert [j.state for j in jobs.unfinished()] == [RUNNING]
    second = jobs.claim(job, now=t0 + 61)  # the first runner crashed: lease expired
    assert second and second.attempts == 2
    assert jobs.claim(job, now=t0 + 200).attempts == 3
    assert jobs.claim(job, now=t0 + 300) is None  # max_attempts used: failed
    failed = jobs.get("demo-moscow", job.id)
    assert failed.state == FAILED and "gave up after 3 attempts" in failed.reason
    assert failed.public()["reason"] == failed.reason and jobs.unfinished() == []


def test_a_draining_runner_gives_its_job_back_at_once(jobs):
    """`release`: accepted again without waiting for the lease, the attempt not counted; only
    by the runner that holds the lease."""
    job, _ = submit(jobs)
    t0 = 1_000_000.0
    first = jobs.claim(job, now=t0)
    released = jobs.release(first)
    assert released.state == ACCEPTED and released.lease_until is None and released.attempts == 0
    again = jobs.claim(job, now=t0 + 1)  # another runner, at once
    assert again and again.attempts == 1
    assert jobs.release(first) is None  # no longer the first runner's: left as it is
    assert jobs.get("demo-moscow", job.id).state == RUNNING
    done = jobs.complete(again, {"ok": True}, {})
    assert jobs.release(again) is None and jobs.get("demo-moscow", job.id).state == done.state == DONE


def test_a_stopping_runner_finishes_what_it_can_and_gives_back_the_rest(jobs):
    """JobRunner.stop: running jobs get the time given, the one still running then is
    cancelled and given back; a draining runner takes no new job."""
    import asyncio

    from mosmedai.config import Settings
    from mosmedai.studies.runner import JobRunner

    quick, _ = submit(jobs)
    slow, _ = submit(jobs)
    late, _ = submit(jobs)

    class Runner(JobRunner):  # tools that take 0.1 s for one job and forever for the other
        async def _work(self, job):
            await asyncio.sleep(0.1 if job.id == quick.id else 3600)
            await asyncio.to_thread(self.jobs.complete, job, {"ok": True}, {})

    async def scenario():
        runner = Runner(jobs, Settings(job_concurrency=4), infer=None)
        runner.submit(quick)
        runner.submit(slow)
        while len(runner.claimed) < 2:
            await asyncio.sleep(0.01)
        released = await runner.stop(within_s=1.0)
        runner.submit(late)
        return released, runner

    released, runner = asyncio.run(scenario())
    assert released == [slow.id] and not runner.tasks
    assert jobs.get("demo-moscow", quick.id).state == DONE
    given_back = jobs.get("demo-moscow", slow.id)
    assert given_back.state == ACCEPTED and given_back.attempts == 0 and given_back.lease_until is None
    assert jobs.get("demo-moscow", late.id).state == ACCEPTED


def test_commit_then_crash_is_finalised_by_claim(jobs):
    job, _ = submit(jobs)
    running = jobs.claim(job)
    # a runner wrote the commit record and died before updating the job record
    jobs.store.put(jobs.results, f"results/{job.tenant}/{job.id}/result.json",
                   b'{"job_id":"x","result":{"ok":true},"objects":{}}', if_none_match=True)
    assert jobs.claim(running, now=running.lease_until + 1) is None
    assert jobs.get(job.tenant, job.id).state == DONE and jobs.result(job.tenant, job.id) == {"ok": True}


def test_pending_series_quiet_time_and_crash(jobs):
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(3)]
    for sop in sops:
        jobs.put_pending("demo-tatarstan", part10(study=study, series=series, sop=sop), study, series, sop)
    other_series = generate_uid()
    lone = generate_uid()
    jobs.put_pending("demo-tatarstan", part10(study=study, series=other_series, sop=lone), study, other_series, lone)
    import time

    assert jobs.pending_series(quiet_s=30, now=time.time()) == []  # still arriving
    pending = jobs.pending_series(quiet_s=30, now=time.time() + 60)
    assert sorted(len(p.keys) for p in pending) == [1, 3]
    mine = next(p for p in pending if p.series_uid == series)
    assert set(mine.sop_uids) == set(sops) and mine.tenant == "demo-tatarstan"

    # crash between creating the job and clearing the pending markers
    reply_to = {"ae_title": "TA_PACS", "host": "127.0.0.1", "port": 11112}
    crashed, created = jobs.create_job(mine.tenant, mine.keys, study_uid=study, sop_uids=mine.sop_uids,
                                       source="dimse", reply_to=reply_to)
    assert created
    job = jobs.job_from_pending(mine, reply_to)  # the restarted service sees the same series
    assert job.id == crashed.id and job.reply_to == reply_to
    assert len(jobs.list_jobs("demo-tatarstan", study)) == 1
    # a late instance of the same series: a job of its own, the first job not repeated
    late = generate_uid()
    jobs.put_pending("demo-tatarstan", part10(study=study, series=series, sop=late), study, series, late)
    again = [p for p in jobs.pending_series(quiet_s=0, now=time.time() + 60) if p.series_uid == series]
    late_job = jobs.job_from_pending(again[0], reply_to)
    assert late_job.sop_uids == (late,) and late_job.id != job.id
    jobs.job_from_pending(next(p for p in pending if p.series_uid == other_series), None)
    assert jobs.pending_series(quiet_s=0, now=time.time() + 60) == []
    assert len(jobs.list_jobs("demo-tatarstan", study)) == 3


def test_delivery_bookkeeping(jobs):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    jobs.put_pending("demo-moscow", part10(study=study, series=series, sop=sop), study, series, sop)
    (series_p,) = jobs.pending_series(quiet_s=0)
    job = jobs.job_from_pending(series_p, {"ae_title": "MOW_PACS", "host": "127.0.0.1", "port": 104})
    assert jobs.undelivered() == []
    done = jobs.complete(jobs.claim(job), {"ok": 1}, {"sr.dcm": b"SR"})
    assert [j.id for j in jobs.undelivered()] == [job.id]
    jobs.delivery_failed(done, "association rejected", retry_at=done.finished_at + 1000)
    assert jobs.undelivered(now=done.finished_at + 10) == []
    assert [j.delivery["attempts"] for j in jobs.undelivered(now=done.finished_at + 2000)] == [1]
    delivered = jobs.delivered(done)
    assert delivered.delivery["state"] == "delivered" and jobs.undelivered(now=done.finished_at + 9999) == []


def test_purge_keeps_deidentified_archive(jobs):
    job, _ = submit(jobs, n=2)
    done = jobs.complete(jobs.claim(job), {"ok": 1}, {})
    assert len(done.archive_keys) == 2 and done.archive_errors == ()
    assert jobs.purge_expired(now=done.finished_at + 10) == 0  # not expired yet
    assert jobs.purge_expired(now=done.finished_at + 3601) == 2
    assert not any(jobs.store.exists(jobs.incoming, k) for k in job.instance_keys)
    assert jobs.get(job.tenant, job.id).purged_at is not None
    for key in done.archive_keys:
        ds = pydicom.dcmread(io.BytesIO(jobs.read(key)))
        assert str(ds.PatientName) != "Ivanov^Ivan" and ds.PatientID != "PID-123"
        assert ds.PatientIdentityRemoved == "YES"
    assert jobs.purge_expired(now=done.finished_at + 9999) == 0
    assert jobs.result(job.tenant, job.id) == {"ok": 1}  # results stay


def test_deidentify_basic_profile():
    study = generate_uid()
    raw = part10(study=study)
    original = pydicom.dcmread(io.BytesIO(raw))
    out = pydicom.dcmread(io.BytesIO(deidentify(raw, uid_secret=b"k")))
    assert str(out.get("PatientName", "")) not in ("Ivanov^Ivan",) and out.get("PatientID") != "PID-123"
    assert out.PatientIdentityRemoved == "YES" and "Basic Application Confidentiality" in out.DeidentificationMethod
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.SOPInstanceUID != original.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert not any(elem.tag.is_private for elem in out)
    assert (out.pixel_array == original.pixel_array).all()
    # the same study maps to the same de-identified study (keyed, stable), not across keys
    other = pydicom.dcmread(io.BytesIO(deidentify(part10(study=study), uid_secret=b"k")))
    assert other.StudyInstanceUID == out.StudyInstanceUID
    assert pydicom.dcmread(io.BytesIO(deidentify(raw, uid_secret=b"j"))).StudyInstanceUID != out.StudyInstanceUID


def test_local_s3_write_log_survives_restart(tmp_path):
    body = b"\x00v1\n{not json}\n" + bytes(range(256)) * 40  # raw bytes in the log: newlines, braces
    with start_local_s3(data_dir=tmp_path) as server:
        store = ObjectStore.local(server.endpoint_url, buckets=["incoming-r"])
        store.ensure_buckets()
        assert store.put("incoming-r", "jobs/a b.json", body, if_none_match=True)
        assert store.put("incoming-r", "jobs/a b.json", b"v2", if_none_match=True) is None
        store.put("incoming-r", "gone", b"x")
        store.delete("incoming-r", "gone")
    # a write cut short by a crash (never acknowledged): its entry is torn and ends the log
    with open(tmp_path / storage.LOG_NAME, "ab") as log:
        log.write(b'{"method":"PUT","path":"/incoming-r/torn","query":"","headers":{},"length":100}\n' + b"x" * 10)
    for _ in range(2):  # replay, then compacted log replay
        with start_local_s3(data_dir=tmp_path) as server:
            store = ObjectStore.local(server.endpoint_url)
            assert store.list("incoming-r") == ["jobs/a b.json"]
            assert store.get("incoming-r", "jobs/a b.json") == body


def test_local_s3_replays_and_converts_a_log_of_the_first_form(tmp_path):
    """A store written before the log kept raw bodies (one JSON line each, base64) still opens."""
    import base64
    import json

    entries = [{"method": "PUT", "path": "/old", "query": "", "headers": {}, "body": ""},
               {"method": "PUT", "path": "/old/k", "query": "", "headers": {},
                "body": base64.b64encode(b"kept\n").decode()}]
    (tmp_path / storage.LEGACY_LOG_NAME).write_text("".join(json.dumps(e) + "\n" for e in entries))
    with start_local_s3(data_dir=tmp_path) as server:
        assert ObjectStore.local(server.endpoint_url).get("old", "k") == b"kept\n"
    assert not (tmp_path / storage.LEGACY_LOG_NAME).exists() and (tmp_path / storage.LOG_NAME).exists()
    with start_local_s3(data_dir=tmp_path) as server:
        assert ObjectStore.local(server.endpoint_url).get("old", "k") == b"kept\n"


def test_local_s3_keeps_connections_alive(tmp_path):
    """Requests in a row through the store's client go over one connection, each answered in
    full: a new connection per request had cost the local store more CPU than the request."""
    with start_local_s3(data_dir=tmp_path) as server:
        store = ObjectStore.local(server.endpoint_url, buckets=["keep"])
        store.ensure_buckets()
        for i in range(10):  # writes, reads, a miss: every kind of answer leaves the connection usable
            store.put("keep", f"k{i}", b"x" * (i * 1000))
            assert store.get("keep", f"k{i}") == b"x" * (i * 1000)
            assert store.get_optional("keep", f"missing{i}") is None
        port = int(server.endpoint_url.rsplit(":", 1)[1])
        # every connection to the server this test opened, open or closed (TIME_WAIT) since
        opened = {c.laddr for c in psutil.net_connections("tcp") if c.raddr and c.raddr.port == port}
        assert len(opened) == 1, f"{len(opened)} connections for 31 requests"
