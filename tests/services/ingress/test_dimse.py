"""DIMSE interface (mosmedai.ingress.dimse) against real network peers.

A pynetdicom SCU sends to the SCP; the SCP persists through the real JobStore on the local
moto S3 server; results go back to pynetdicom test SCPs; dcmtk's echoscu/storescu when
installed.
"""

from __future__ import annotations

import io
import itertools
import shutil
import socket
import subprocess
import time

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from mosmedai.ingress import dimse
from mosmedai.phantoms.dicom_build import build_dataset, ct_series
from mosmedai.jobs.store import JobStore
from mosmedai.jobs.storage import LOCAL_CREDENTIALS, ObjectStore, free_port, start_local_s3
from mosmedai.ingress.tenants import DimseConfig, ResultDestination, Tenant, TenantRegistry, hash_token

pytestmark = pytest.mark.timeout(180)

CALLED, CALLING = "MOSMEDAI_T1", "MODALITY_1"
_bucket_numbers = itertools.count()


# --- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3():
    server = start_local_s3()
    yield server
    server.stop()


def _job_store(endpoint_url: str, **store_options) -> JobStore:
    n = next(_bucket_numbers)
    objects = ObjectStore(endpoint_url, "us-east-1", credentials=LOCAL_CREDENTIALS, **store_options)
    jobs = JobStore(objects, f"incoming-{n}", f"results-{n}", f"archive-{n}", retention_s=3600)
    jobs.ensure_buckets()
    return jobs


@pytest.fixture
def jobs(s3) -> JobStore:
    return _job_store(s3.endpoint_url)


def _tenant(tenant_id: str, called: str, calling: tuple[str, ...], destination=None) -> Tenant:
    return Tenant(tenant_id, "RU-MOW", "Test clinic", hash_token(tenant_id),
                  DimseConfig(called, calling, destination))


@pytest.fixture
def registry() -> TenantRegistry:
    return TenantRegistry([_tenant("t1", CALLED, (CALLING, "STORESCU", "ECHOSCU"))])


def _server(registry, jobs, loops=False, **options) -> dimse.DimseServer:
    defaults = dict(host="127.0.0.1", port=0, series_quiet_s=1.0, poll_s=0.2, retry_base_s=0.5,
                    retry_max_s=2.0, connect_timeout_s=2.0, network_timeout_s=10.0)
    return dimse.DimseServer(registry, jobs, **{**defaults, **options}).start(loops=loops)


@pytest.fixture
def scp(registry, jobs):
    server = _server(registry, jobs)
    yield server
    server.stop()


# --- helpers -------------------------------------------------------------------------------

def _scu(*contexts, calling=CALLING) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for context in contexts or (DigitalXRayImageStorageForPresentation,):
        if isinstance(context, tuple):
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    return ae


def _associate(server, *contexts, called=CALLED, calling=CALLING):
    return _scu(*contexts, calling=calling).associate("127.0.0.1", server.port, ae_title=called)


def _dx(rows=2500, columns=2048) -> Dataset:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16)
    return build_dataset(pixels, modality="DX", bits_stored=12, BodyPartExamined="CHEST", ViewPosition="PA")


def _ct(slices=4) -> list[Dataset]:
    volume = np.full((slices, 64, 64), -1000.0)
    volume[:, 16:48, 16:48] = 40.0
    return ct_series(volume, (2.5, 0.7, 0.7))


def _raw_store(assoc, sop_class: str, sop_instance: str, raw: bytes, context_sop_class: str | None = None):
    """A C-STORE with these exact data-set bytes (what a broken sender would send)."""
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == (context_sop_class or sop_class))
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 2
    request.DataSet = io.BytesIO(raw)
    # As Association.send_c_store does: pause the reactor so that it leaves the reply to us.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return response


def _encode(dataset: Dataset, implicit=False) -> bytes:
    """The data set without file meta, as it travels in a presentation context."""
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    pydicom.filewriter.write_dataset(buffer, dataset)
    return buffer.getvalue()


def _wait(predicate, timeout_s=30.0, step_s=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def _pending_keys(jobs: JobStore) -> list[str]:
    return jobs.store.list(jobs.incoming, "pending/")


# --- association ---------------------------------------------------------------------------

def test_echo(scp):
    assoc = _associate(scp, Verification)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


@pytest.mark.parametrize("called, calling, reason", [
    ("UNKNOWN_AE", CALLING, 0x07),  # called AE title not recognised
    (CALLED, "INTRUDER", 0x03),     # calling AE title not recognised
])
def test_association_rejected_by_ae_titles(scp, called, calling, reason):
    assoc = _associate(scp, Verification, called=called, calling=calling)
    assert assoc.is_rejected
    reply = assoc.acceptor.primitive
    assert (reply.result, reply.result_source, reply.diagnostic) == (0x01, 0x01, reason)


def test_tenant_without_dimse_is_an_unknown_called_ae(jobs):
    registry = TenantRegistry([Tenant("t2", "RU-TA", "x", hash_token("t2"), None),
                               _tenant("t1", CALLED, (CALLING,))])
    server = _server(registry, jobs)
    try:
        assert _associate(server, Verification, called="t2").is_rejected
        assert _associate(server, Verification).is_established
    finally:
        server.stop()


def test_unsupported_sop_classes_refused_at_negotiation(scp):
    assoc = _associate(scp, DigitalXRayImageStorageForPresentation, SecondaryCaptureImageStorage,
                       EnhancedCTImageStorage)
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    refused = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
    assert accepted == {DigitalXRayImageStorageForPresentation}
    assert refused == {SecondaryCaptureImageStorage: 0x03, EnhancedCTImageStorage: 0x03}  # abstract syntax not supported
    with pytest.raises(ValueError):  # the SCU cannot even send it
        sc = build_dataset(np.zeros((16, 16), np.uint8), modality="OT")
        sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        assoc.send_c_store(sc)
    # A broken SCU that sends it on another context gets 0x0122 (SOP class not supported).
    sc = build_dataset(np.zeros((16, 16), np.uint8), modality="OT")
    sc.SOPClassUID = SecondaryCaptureImageStorage
    response = _raw_store(assoc, SecondaryCaptureImageStorage, sc.SOPInstanceUID, _encode(sc),
                          context_sop_class=DigitalXRayImageStorageForPresentation)
    assert response.Status == 0x0122
    assoc.release()


# --- C-STORE -------------------------------------------------------------------------------

def test_real_size_dx_is_persisted_before_success(scp, jobs):
    dx = _dx()
    assoc = _associate(scp)
    status = assoc.send_c_store(dx)
    assoc.release()
    assert status.Status == 0x0000
    key = JobStore.instance_key("t1", dx.StudyInstanceUID, dx.SeriesInstanceUID, dx.SOPInstanceUID)
    stored = pydicom.dcmread(io.BytesIO(jobs.read(key)))
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.file_meta.MediaStorageSOPInstanceUID == dx.SOPInstanceUID
    assert (stored.Rows, stored.Columns) == (2500, 2048)
    assert stored.PixelData == dx.PixelData
    assert _pending_keys(jobs) == [f"pending/t1/{dx.StudyInstanceUID}/{dx.SeriesInstanceUID}/{dx.SOPInstanceUID}"]


def test_ct_series_compressed_and_implicit(scp, jobs):
    series = _ct(4)
    assoc = _associate(scp, (CTImageStorage, [RLELossless]), (ComputedRadiographyImageStorage, [ImplicitVRLittleEndian]))
    assert assoc.is_established
    for dataset in series:
        dataset.compress(RLELossless)
        assert assoc.send_c_store(dataset).Status == 0x0000
    cr = build_dataset(np.zeros((64, 64), np.uint16), modality="CR")
    cr.SOPClassUID = cr.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    assert assoc.send_c_store(cr).Status == 0x0000
    assoc.release()
    stored = pydicom.dcmread(io.BytesIO(jobs.read(JobStore.instance_key(
        "t1", series[0].StudyInstanceUID, series[0].SeriesInstanceUID, series[0].SOPInstanceUID))))
    assert stored.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(stored.pixel_array, series[0].pixel_array)
    assert len(_pending_keys(jobs)) == 5


def test_corrupt_data_set_is_0xC000(scp, jobs):
    assoc = _associate(scp)
    dx = build_dataset(np.zeros((64, 64), np.uint16))
    raw = _encode(dx)
    cases = [
        raw[:raw.index(dx.SOPInstanceUID.encode()) + 10],  # cut inside an element
        raw[:-1000],                                     # Pixel Data cut short
        np.random.default_rng(1).bytes(4000),            # noise
    ]
    for body in cases:
        response = _raw_store(assoc, dx.SOPClassUID, dx.SOPInstanceUID, body)
        assert response.Status == 0xC000, body[:16]
    assoc.release()
    assert _pending_keys(jobs) == []


def test_data_set_not_matching_sop_class_is_0xA900(scp, jobs):
    assoc = _associate(scp)

    def store(dataset, sop_class=None, sop_instance=None):
        response = _raw_store(assoc, sop_class or DigitalXRayImageStorageForPresentation,
                              sop_instance or dataset.SOPInstanceUID, _encode(dataset),
                              context_sop_class=DigitalXRayImageStorageForPresentation)
        return response.Status

    assert store(build_dataset(np.zeros((64, 64), np.uint16), modality="CT")) == 0xA900  # Modality
    no_pixels = build_dataset(np.zeros((64, 64), np.uint16))
    del no_pixels.PixelData
    assert store(no_pixels) == 0xA900
    no_rows = build_dataset(np.zeros((64, 64), np.uint16))
    del no_rows.Rows
    assert store(no_rows) == 0xA900
    other_class = build_dataset(np.zeros((64, 64), np.uint16), modality="CR")
    other_class.SOPClassUID = ComputedRadiographyImageStorage  # the request says DX
    assert store(other_class) == 0xA900
    other_instance = build_dataset(np.zeros((64, 64), np.uint16))
    assert store(other_instance, sop_instance=generate_uid()) == 0xA900
    small_pixels = build_dataset(np.zeros((64, 64), np.uint16))
    small_pixels.Rows = 128  # the pixel data holds half of that
    assert store(small_pixels) == 0xA900
    # and a good one on the same association still works
    assert store(build_dataset(np.zeros((64, 64), np.uint16))) == 0x0000
    assoc.release()
    assert len(_pending_keys(jobs)) == 1


def test_storage_down_is_0xA700(registry):
    s3 = start_local_s3()
    try:
        jobs = _job_store(s3.endpoint_url, max_attempts=2, connect_timeout_s=1.0)
        server = _server(registry, jobs)
        try:
            assoc = _associate(server)
            first = build_dataset(np.zeros((64, 64), np.uint16))
            assert assoc.send_c_store(first).Status == 0x0000
            s3.stop()
            status = assoc.send_c_store(build_dataset(np.zeros((64, 64), np.uint16)))
            assert status.Status == 0xA700
            assert "could not be stored" in status.ErrorComment
            assert assoc.is_established  # a status, not a dropped association
            assoc.release()
        finally:
            server.stop()
    finally:
        s3.stop()


# --- series completion ---------------------------------------------------------------------

def test_series_completion_after_quiet_time(registry, jobs):
    server = _server(registry, jobs, loops=True, series_quiet_s=2.0)
    try:
        series = _ct(5)
        assoc = _associate(server, CTImageStorage)
        for dataset in series[:3]:
            assert assoc.send_c_store(dataset).Status == 0x0000
        time.sleep(1.0)  # less than the quiet time: the series is still open
        for dataset in series[3:]:
            assert assoc.send_c_store(dataset).Status == 0x0000
        assoc.release()
        assert jobs.list_jobs("t1") == []
        found = _wait(lambda: jobs.list_jobs("t1"), timeout_s=20)
        time.sleep(1.0)  # no second job appears
        found = jobs.list_jobs("t1")
        assert len(found) == 1
        job = found[0]
        assert set(job.sop_uids) == {d.SOPInstanceUID for d in series}
        assert job.source == "dimse" and job.reply_to is None  # t1 has no result destination
        assert _pending_keys(jobs) == []
    finally:
        server.stop()


# --- result delivery -----------------------------------------------------------------------

class _StoreSCP:
    """A pynetdicom C-STORE SCP keeping what it receives."""

    def __init__(self, ae_title: str, port: int = 0):
        self.received: list[Dataset] = []
        self.ae = AE(ae_title=ae_title)
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = self.ae.start_server(("127.0.0.1", port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event):
        self.received.append(event.dataset)
        return 0x0000

    def stop(self):
        self.server.shutdown()


class _Blackhole:
    """Accepts TCP connections and never answers: a destination that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def stop(self):
        self.sock.close()


def _sr(job) -> bytes:
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID = job.study_uid, generate_uid()
    sr.Modality, sr.ValueType, sr.CompletionFlag, sr.VerificationFlag = "SR", "CONTAINER", "COMPLETE", "UNVERIFIED"
    sr.ContentSequence = []
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _sc(job) -> bytes:
    sc = build_dataset(np.zeros((32, 32), np.uint8), modality="OT", StudyInstanceUID=job.study_uid)
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    buffer = io.BytesIO()
    sc.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _send_and_complete(server, jobs, tenant_id, called, calling):
    series = _ct(2)
    assoc = _associate(server, CTImageStorage, called=called, calling=calling)
    for dataset in series:
        assert assoc.send_c_store(dataset).Status == 0x0000
    assoc.release()
    job = _wait(lambda: (jobs.list_jobs(tenant_id) or [None])[0])
    running = jobs.claim(job)
    sr, sc = _sr(job), _sc(job)
    done = jobs.complete(running, {"findings": []}, {"sr.dcm": sr, "sc/1.dcm": sc})
    return done, {pydicom.dcmread(io.BytesIO(sr)).SOPInstanceUID, pydicom.dcmread(io.BytesIO(sc)).SOPInstanceUID}


def test_results_delivered_and_an_outage_does_not_block_others(jobs):
    up = _StoreSCP("PACS_UP")
    hanging = _Blackhole()
    registry = TenantRegistry([
        _tenant("up", "MOSMEDAI_UP", ("MOD_UP",), ResultDestination("PACS_UP", "127.0.0.1", up.port)),
        _tenant("down", "MOSMEDAI_DOWN", ("MOD_DOWN",), ResultDestination("PACS_DOWN", "127.0.0.1", hanging.port)),
    ])
    server = _server(registry, jobs, loops=True, network_timeout_s=4.0, retry_base_s=0.5, retry_max_s=1.0)
    revived = None
    try:
        down_job, down_sops = _send_and_complete(server, jobs, "down", "MOSMEDAI_DOWN", "MOD_DOWN")
        assert down_job.reply_to == {"ae_title": "PACS_DOWN", "host": "127.0.0.1", "port": hanging.port}
        time.sleep(0.5)  # the hanging destination's worker is now stuck in its association
        up_job, up_sops = _send_and_complete(server, jobs, "up", "MOSMEDAI_UP", "MOD_UP")
        started = time.monotonic()
        _wait(lambda: len(up.received) == 2, timeout_s=15)
        assert time.monotonic() - started < 3.5  # well inside the hanging association's timeout
        assert {d.SOPInstanceUID for d in up.received} == up_sops
        assert {d.SOPClassUID for d in up.received} == {ComprehensiveSRStorage, SecondaryCaptureImageStorage}
        assert _wait(lambda: (jobs.get("up", up_job.id).delivery or {}).get("state") == "delivered")

        # The hanging one fails (association timeout), is recorded and retried with backoff.
        failed = _wait(lambda: (lambda j: j if (j.delivery or {}).get("attempts", 0) >= 1 else None)(
            jobs.get("down", down_job.id)), timeout_s=20)
        assert failed.delivery["state"] == "pending" and failed.delivery["error"]
        assert failed.delivery["next_at"] > failed.updated_at - 0.1
        # Now the destination comes back on the same port: the next retry delivers.
        hanging.stop()
        revived = _StoreSCP("PACS_DOWN", port=hanging.port)
        _wait(lambda: len(revived.received) == 2, timeout_s=30)
        assert {d.SOPInstanceUID for d in revived.received} == down_sops
        final = _wait(lambda: (lambda j: j if (j.delivery or {}).get("state") == "delivered" else None)(
            jobs.get("down", down_job.id)))
        assert final.delivery["attempts"] >= 2
        assert jobs.undelivered(time.time() + 3600) == []
        assert len(up.received) == 2  # delivered once
    finally:
        server.stop()
        up.stop()
        hanging.stop()
        if revived is not None:
            revived.stop()


def test_backoff_schedule():
    assert [dimse.backoff_s(n, 30, 600) for n in range(1, 8)] == [30, 60, 120, 240, 480, 600, 600]


def test_refused_destination_records_backoff(jobs):
    port = free_port()  # nothing listens there: connection refused
    registry = TenantRegistry([_tenant("t1", CALLED, (CALLING,), ResultDestination("NOBODY", "127.0.0.1", port))])
    server = _server(registry, jobs, loops=False, retry_base_s=5.0, retry_max_s=60.0)
    try:
        series = _ct(1)
        assoc = _associate(server, CTImageStorage)
        assert assoc.send_c_store(series[0]).Status == 0x0000
        assoc.release()
        [job] = server.complete_series(now=time.time() + 10)
        done = jobs.complete(jobs.claim(job), {}, {"sr.dcm": _sr(job)})
        for attempt, delay in ((1, 5.0), (2, 10.0), (3, 20.0)):
            before = time.time()
            server.deliver(jobs.get("t1", done.id), ("NOBODY", "127.0.0.1", port))
            after = jobs.get("t1", done.id)
            assert after.delivery["attempts"] == attempt
            assert before + delay - 0.5 <= after.delivery["next_at"] <= time.time() + delay + 0.5
        assert jobs.undelivered(time.time()) == []  # not due before next_at
        assert [j.id for j in jobs.undelivered(time.time() + 21)] == [done.id]
    finally:
        server.stop()


# --- settings ------------------------------------------------------------------------------

def test_options_from_settings():
    class FakeSettings:
        bind_host = "0.0.0.0"
        dimse_port = 104
        dimse_series_quiet_s = 3.0

    options = dimse.DimseOptions.from_settings(FakeSettings())
    assert (options.host, options.port, options.series_quiet_s) == ("0.0.0.0", 104, 3.0)
    assert options.retry_base_s == dimse.DimseOptions().retry_base_s


# --- dcmtk peers ---------------------------------------------------------------------------

@pytest.mark.skipif(not (shutil.which("echoscu") and shutil.which("storescu")), reason="dcmtk not installed")
def test_dcmtk_echoscu_and_storescu(scp, jobs, tmp_path):
    port = str(scp.port)
    echo = subprocess.run(["echoscu", "-aet", "ECHOSCU", "-aec", CALLED, "127.0.0.1", port],
                          capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    refused = subprocess.run(["echoscu", "-aet", "ECHOSCU", "-aec", "NOBODY", "127.0.0.1", port],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    dx = _dx(512, 512)
    path = tmp_path / "dx.dcm"
    dx.save_as(path, enforce_file_format=True)
    store = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", CALLED, "127.0.0.1", port, str(path)],
                           capture_output=True, text=True, timeout=60)
    assert store.returncode == 0, store.stderr
    key = JobStore.instance_key("t1", dx.StudyInstanceUID, dx.SeriesInstanceUID, dx.SOPInstanceUID)
    assert pydicom.dcmread(io.BytesIO(jobs.read(key))).PixelData == dx.PixelData
