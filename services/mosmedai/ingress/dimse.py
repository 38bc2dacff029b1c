"""DICOM DIMSE interface: C-ECHO / C-STORE SCP in, C-STORE SCU out (issue 4).

Inbound: a pynetdicom acceptor on ``dimse_port`` (11112). The *called* AE title picks the
tenant (:meth:`TenantRegistry.by_called_ae`); an unknown one is rejected (rejected-permanent,
service-user, reason 7 "called AE title not recognised"), and a *calling* AE title outside
the tenant's ``allowed_calling_aes`` is rejected with reason 3 ("calling AE title not
recognised"). Storage contexts are offered for the SOP classes the platform reads (CR, DX
for presentation / for processing, Digital Mammography for presentation, CT Image) in the
common uncompressed and compressed transfer syntaxes; any other SOP class is refused at
presentation-context negotiation, and a C-STORE naming another SOP class gets 0x0122.

Each instance is checked, persisted with :meth:`JobStore.put_pending` and only then
acknowledged (0x0000). Statuses (PS3.4 B.2.3):

* 0xA900 the data set does not match the SOP class (SOP Class / Instance UID differ from the
  request's, Modality not one the IOD allows, Rows / Columns / Pixel Data or a UID missing);
* 0xC000 the data set cannot be parsed;
* 0xA700 out of resources: the instance could not be persisted (object store down);
* 0x0122 SOP class not supported; 0x0110 anything unexpected (a bug here, not the sender's).

Two background threads: *series completion* turns series with no new instance for
``series_quiet_s`` into jobs (``reply_to`` = the tenant's result destination), and *result
delivery* sends the SR / SC objects of finished jobs back by C-STORE, one worker thread per
destination (an outage of one never delays another), retrying with exponential backoff.

Run with ``python -m mosmedai.ingress.dimse`` (reads :class:`mosmedai.config.Settings`, see
:meth:`DimseOptions.from_settings` for the fields).
"""

from __future__ import annotations

import io
import logging
import queue
import re
import signal
import struct
import threading
import time
from dataclasses import dataclass, fields
from typing import Iterable, Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

LOGGER = logging.getLogger("mosmedai.ingress.dimse")

# --- what the SCP accepts ----------------------------------------------------------------

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

#: SOP class -> the Modality values its IOD allows (PS3.3 A.2, A.26, A.27, A.3).
#: Not accepted: Enhanced CT (multi-frame; the CT path reads one slice per instance),
#: Secondary Capture (no acquisition facts to route on), DX/MG for intra-oral and MG for
#: processing (no tool reads them).
STORAGE_SOP_CLASSES: dict[str, frozenset[str]] = {
    CR_IMAGE_STORAGE: frozenset({"CR"}),
    DX_FOR_PRESENTATION: frozenset({"DX"}),
    DX_FOR_PROCESSING: frozenset({"DX"}),
    MG_FOR_PRESENTATION: frozenset({"MG"}),
    CT_IMAGE_STORAGE: frozenset({"CT"}),
}

#: Uncompressed little endian, JPEG baseline / extended / lossless, JPEG-LS lossless,
#: JPEG 2000 (lossless and lossy), RLE. Not offered: Explicit VR Big Endian (retired) and
#: Deflated (nobody sends images deflated); a peer then falls back to Implicit VR LE.
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110
STORE_SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})  # success and warnings

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason.
REJECTED_PERMANENT = 0x01
SERVICE_USER = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
REASON_CALLED_AE_NOT_RECOGNISED = 0x07

PIXEL_DATA = 0x7FE00010
PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"
UNDEFINED_LENGTH = 0xFFFFFFFF
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # PS3.5 9.1 (at most 64 characters, checked apart)


# --- the interfaces used (mosmedai.ingress.tenants, mosmedai.jobs.store) -------------------------------


class _Destination(Protocol):
    ae_title: str
    host: str
    port: int


class _TenantDimse(Protocol):
    called_ae_title: str
    allowed_calling_aes: tuple[str, ...]
    result_destination: _Destination | None


class _Tenant(Protocol):
    id: str
    dimse: _TenantDimse | None


class _Registry(Protocol):
    def by_called_ae(self, ae_title: str) -> _Tenant | None: ...
    def get(self, tenant_id: str) -> _Tenant | None: ...


class _JobStore(Protocol):
    def put_pending(self, tenant_id, part10_bytes, study_uid, series_uid, sop_uid): ...
    def pending_series(self, quiet_s, now=None): ...
    def job_from_pending(self, series, reply_to): ...
    def undelivered(self, now): ...
    def object_keys(self, job): ...
    def read(self, key): ...
    def delivery_failed(self, job, error, retry_at): ...
    def delivered(self, job): ...


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class DimseOptions:
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "MOSMEDAI"  # the SCU's calling AE title when delivering results
    series_quiet_s: float = 10.0
    poll_s: float = 1.0
    retry_base_s: float = 30.0
    retry_max_s: float = 3600.0
    max_pdu: int = 262144
    max_associations: int = 32
    network_timeout_s: float = 60.0
    connect_timeout_s: float = 10.0

    #: Settings field -> DimseOptions field (the lead adds these to config.py).
    SETTINGS_FIELDS = {
        "bind_host": "host",
        "dimse_port": "port",
        "dimse_ae_title": "ae_title",
        "dimse_series_quiet_s": "series_quiet_s",
        "dimse_poll_s": "poll_s",
        "dimse_retry_base_s": "retry_base_s",
        "dimse_retry_max_s": "retry_max_s",
        "dimse_max_pdu": "max_pdu",
        "dimse_max_associations": "max_associations",
        "dimse_network_timeout_s": "network_timeout_s",
        "dimse_connect_timeout_s": "connect_timeout_s",
    }

    @classmethod
    def from_settings(cls, settings) -> "DimseOptions":
        """The DIMSE fields of a Settings; a field Settings does not (yet) have keeps the
        default above."""
        values = {}
        for setting, name in cls.SETTINGS_FIELDS.items():
            if hasattr(settings, setting):
                values[name] = getattr(settings, setting)
        return cls(**values)


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before retry number ``attempt`` (1 = after the first failure): base * 2^(n-1)."""
    return min(max_s, base_s * (2 ** max(0, attempt - 1)))


# --- inbound: association checks ---------------------------------------------------------


class _TenantACSE(ACSE):
    """Rejects by tenant before pynetdicom's own negotiation (which knows only AE-wide lists).

    Overrides pynetdicom internals (``ACSE._negotiate_as_acceptor``,
    ``RequestHandler._create_association``, ``Association._server``) as of pynetdicom 3.0;
    the association tests fail if an upgrade changes them.
    """

    def _negotiate_as_acceptor(self) -> None:
        request: A_ASSOCIATE = self.requestor.primitive
        called = str(request.called_ae_title or "").strip()
        calling = str(request.calling_ae_title or "").strip()
        server: DimseServer = self.assoc._server.mosmedai  # type: ignore[attr-defined]
        reason = None
        try:
            tenant = server.registry.by_called_ae(called)
        except Exception:
            LOGGER.exception("tenant lookup for called AE %r failed", called)
            tenant = None
        if tenant is None or tenant.dimse is None:
            reason = REASON_CALLED_AE_NOT_RECOGNISED
            LOGGER.warning("association from %r to unknown called AE %r rejected", calling, called)
        elif calling not in {str(ae).strip() for ae in (tenant.dimse.allowed_calling_aes or ())}:
            reason = REASON_CALLING_AE_NOT_RECOGNISED
            LOGGER.warning("association from %r to %r (tenant %s) rejected: calling AE not allowed",
                           calling, called, tenant.id)
        if reason is not None:
            self.requestor.ae_title = request.calling_ae_title
            self.send_reject(REJECTED_PERMANENT, SERVICE_USER, reason)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        self.assoc.mosmedai_tenant = tenant  # type: ignore[attr-defined]
        self.acceptor.ae_title = called
        super()._negotiate_as_acceptor()


class _TenantRequestHandler(RequestHandler):
    def _create_association(self):
        assoc = super()._create_association()
        assoc.acse = _TenantACSE(assoc)
        return assoc


# --- inbound: C-STORE checks -------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _read_header(raw: bytes, implicit: bool) -> tuple[Dataset, int | None]:
    """The data set's elements before Pixel Data, and the offset of Pixel Data (or None).

    pydicom reads a damaged data set without complaint (a value cut short is simply shorter);
    here every top-level element must hold the bytes its length says.
    """
    stream = io.BytesIO(raw)
    elements = {}
    try:
        for element in data_element_generator(stream, implicit, True,
                                              stop_when=lambda tag, vr, length: tag == PIXEL_DATA):
            length = getattr(element, "length", None)
            value = element.value
            if length is not None and length != UNDEFINED_LENGTH and isinstance(value, bytes) \
                    and len(value) != length:
                raise _Refused(CANNOT_UNDERSTAND, f"element {element.tag} is cut short or its length is "
                                                  f"wrong ({len(value)} of {length} bytes)")
            elements[element.tag] = element
    except _Refused:
        raise
    except Exception as error:  # pydicom raises many types on a damaged data set
        raise _Refused(CANNOT_UNDERSTAND, f"the data set cannot be parsed: {error}") from None
    offset = stream.tell()
    return Dataset(elements), (offset if raw[offset:offset + 4] == PIXEL_DATA_TAG_LE else None)


def _check_pixel_data(raw: bytes, offset: int, implicit: bool, compressed: bool, needed: int) -> None:
    header = 8 if implicit else 12
    if len(raw) < offset + header:
        raise _Refused(CANNOT_UNDERSTAND, "the data set ends inside the Pixel Data element's header")
    (length,) = struct.unpack_from("<I", raw, offset + header - 4)
    if length == UNDEFINED_LENGTH:
        if not compressed:
            raise _Refused(CANNOT_UNDERSTAND, "encapsulated Pixel Data in an uncompressed transfer syntax")
        if raw.rfind(SEQUENCE_DELIMITER, offset + header) < 0:
            raise _Refused(CANNOT_UNDERSTAND, "the encapsulated Pixel Data has no sequence delimiter (cut short)")
        return
    if compressed:
        raise _Refused(CANNOT_UNDERSTAND, "native Pixel Data in a compressed transfer syntax")
    if offset + header + length > len(raw):
        raise _Refused(CANNOT_UNDERSTAND, f"the Pixel Data is cut short ({len(raw) - offset - header} of "
                                          f"{length} bytes)")
    if length < needed:
        raise _Refused(DOES_NOT_MATCH_SOP_CLASS, f"the Pixel Data holds {length} bytes; the image attributes "
                                                 f"need {needed}")


def check_instance(raw: bytes, transfer_syntax: str, affected_sop_class: str,
                   affected_sop_instance: str) -> Dataset:
    """Check a received data set (as sent, without file meta) against its SOP class.

    Returns the header (elements before Pixel Data). Raises :class:`_Refused` with 0xC000
    (cannot be parsed) or 0xA900 (does not match the SOP class).
    """
    implicit = transfer_syntax == ImplicitVRLittleEndian
    compressed = transfer_syntax not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
    dataset, pixel_offset = _read_header(raw, implicit)
    try:
        sop_class = str(dataset.get("SOPClassUID", "") or "").strip()
        sop_instance = str(dataset.get("SOPInstanceUID", "") or "").strip()
        modality = str(dataset.get("Modality", "") or "").strip().upper()
        numbers = {key: int(dataset.get(key, 0) or 0)
                   for key in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel")}
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        uids = {key: str(dataset.get(key, "") or "").strip() for key in ("StudyInstanceUID", "SeriesInstanceUID")}
    except Exception as error:  # a value pydicom cannot convert
        raise _Refused(CANNOT_UNDERSTAND, f"the data set cannot be parsed: {error}") from None
    if sop_class != affected_sop_class:
        raise _Refused(DOES_NOT_MATCH_SOP_CLASS,
                       f"SOP Class UID {sop_class or '(none)'} differs from the request's {affected_sop_class}")
    if sop_instance != affected_sop_instance:
        raise _Refused(DOES_NOT_MATCH_SOP_CLASS,
                       f"SOP Instance UID {sop_instance or '(none)'} differs from the request's "
                       f"{affected_sop_instance}")
    allowed = STORAGE_SOP_CLASSES[affected_sop_class]
    if modality not in allowed:
        raise _Refused(DOES_NOT_MATCH_SOP_CLASS,
                       f"Modality {modality or '(none)'} is not allowed for SOP class {affected_sop_class} "
                       f"({', '.join(sorted(allowed))})")
    missing = [key for key, value in uids.items() if not value]
    bad = [f"{key} {value!r}" for key, value in {**uids, "SOPInstanceUID": sop_instance}.items()
           if value and (len(value) > 64 or not _UID.match(value))]
    if bad:
        raise _Refused(DOES_NOT_MATCH_SOP_CLASS, f"not a DICOM UID: {', '.join(bad)}")
    missing += [key for key in ("Rows", "Columns", "BitsAllocated") if numbers[key] <= 0]
    if pixel_offset is None:
        missing.append("PixelData")
    if missing:
        raise _Refused(DOES_NOT_MATCH_SOP_CLASS, f"required attributes missing: {', '.join(missing)}")
    needed = (numbers["Rows"] * numbers["Columns"] * max(1, numbers["SamplesPerPixel"]) * max(1, frames)
              * numbers["BitsAllocated"] + 7) // 8
    _check_pixel_data(raw, pixel_offset, implicit, compressed, needed)
    return dataset


# --- the server --------------------------------------------------------------------------


class DimseServer:
    """The SCP plus the series-completion and result-delivery loops.

    ``start()`` binds and starts the threads (returns at once); ``stop()`` ends them.
    ``complete_series()`` and ``deliver_due()`` are one pass of each loop, for tests and tools.
    """

    def __init__(self, registry: _Registry, store: _JobStore, options: DimseOptions | None = None,
                 **overrides):
        self.registry = registry
        self.store = store
        base = options or DimseOptions()
        self.config = DimseOptions(**{f.name: overrides.get(f.name, getattr(base, f.name))
                                     for f in fields(DimseOptions)})
        unknown = set(overrides) - {f.name for f in fields(DimseOptions)}
        if unknown:
            raise TypeError(f"unknown DimseServer options: {sorted(unknown)}")
        self._server: ThreadedAssociationServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: dict[tuple[str, str, int], _DestinationWorker] = {}
        self.ae = self._make_ae()

    # ---- lifecycle

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = self.config.max_pdu
        ae.maximum_associations = self.config.max_associations
        ae.network_timeout = self.config.network_timeout_s
        ae.acse_timeout = self.config.network_timeout_s
        ae.dimse_timeout = self.config.network_timeout_s
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    def start(self, loops: bool = True) -> "DimseServer":
        handlers = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store)]
        server = ThreadedAssociationServer(
            self.ae, (self.config.host, self.config.port), self.config.ae_title,
            self.ae.supported_contexts, evt_handlers=handlers, request_handler=_TenantRequestHandler,
        )
        server.mosmedai = self  # type: ignore[attr-defined]
        self._server = server
        self.ae._servers.append(server)
        self._spawn(server.serve_forever, "dimse-scp")
        if loops:
            self._spawn(self._loop(self.complete_series), "dimse-series")
            self._spawn(self._loop(self.dispatch_deliveries), "dimse-delivery")
        LOGGER.info("DIMSE SCP listening on %s:%d", self.config.host, self.port)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            if self._server in self.ae._servers:
                self.ae._servers.remove(self._server)
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.stop()
        for thread in self._threads:
            thread.join(timeout=self.config.network_timeout_s)
        for worker in workers:
            worker.join(timeout=self.config.network_timeout_s)

    def __enter__(self) -> "DimseServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _loop(self, step):
        def run():
            while not self._stop.is_set():
                try:
                    step()
                except Exception:  # keep the loop alive: the store may be down for a while
                    LOGGER.exception("%s failed", getattr(step, "__name__", step))
                self._stop.wait(self.config.poll_s)
        return run

    # ---- SCP handlers (never raise: pynetdicom would answer 0xC211 / abort)

    def _on_echo(self, event) -> int:
        return SUCCESS

    def _on_store(self, event) -> int | tuple[int, Dataset]:
        try:
            return self._store(event)
        except Exception as error:
            LOGGER.exception("C-STORE handler failed")
            return _status(PROCESSING_FAILURE, f"internal error: {type(error).__name__}")

    def _store(self, event):
        request = event.request
        context = event.context
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        if sop_class not in STORAGE_SOP_CLASSES or sop_class != str(context.abstract_syntax):
            return _status(SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not accepted on this context")
        tenant = getattr(event.assoc, "mosmedai_tenant", None)
        if tenant is None:  # cannot happen: the association was accepted for a tenant
            return _status(PROCESSING_FAILURE, "no tenant for this association")
        try:
            raw = event.encoded_dataset(include_meta=False)
            transfer_syntax = str(context.transfer_syntax)
            dataset = check_instance(raw, transfer_syntax, sop_class, sop_instance)
        except _Refused as refused:
            LOGGER.info("C-STORE %s refused (0x%04X): %s", sop_instance, refused.status, refused)
            return _status(refused.status, str(refused))
        part10 = event.encoded_dataset(include_meta=True)
        try:
            self.store.put_pending(tenant.id, part10, str(dataset.StudyInstanceUID),
                                   str(dataset.SeriesInstanceUID), sop_instance)
        except Exception as error:  # storage.StorageError and anything else on the way to S3
            LOGGER.error("C-STORE %s for tenant %s not persisted: %s", sop_instance, tenant.id, error)
            return _status(OUT_OF_RESOURCES, f"the instance could not be stored: {error}")
        return SUCCESS

    # ---- series completion

    def complete_series(self, now: float | None = None) -> list:
        """One pass: every quiet pending series becomes a job. Returns the jobs."""
        jobs = []
        for series in self.store.pending_series(self.config.series_quiet_s, now=now):
            try:
                reply_to = self._reply_to(series)
                jobs.append(self.store.job_from_pending(series, reply_to))
            except Exception:
                LOGGER.exception("job for pending series %s of tenant %s not created",
                                 series.series_uid, series.tenant)
        return jobs

    def _reply_to(self, series) -> dict | None:
        tenant = self.registry.get(series.tenant)
        destination = tenant.dimse.result_destination if tenant is not None and tenant.dimse else None
        if destination is None:
            return None
        return {"ae_title": destination.ae_title, "host": destination.host, "port": int(destination.port)}

    # ---- result delivery

    def dispatch_deliveries(self, now: float | None = None) -> int:
        """One pass: hand every due undelivered job to its destination's worker.

        Returns how many were handed over (jobs already queued or in flight are skipped).
        """
        handed = 0
        for job in self.store.undelivered(time.time() if now is None else now):
            reply_to = getattr(job, "reply_to", None)
            if not reply_to:
                continue
            key = (str(reply_to["ae_title"]), str(reply_to["host"]), int(reply_to["port"]))
            with self._lock:
                worker = self._workers.get(key)
                if worker is None:
                    worker = self._workers[key] = _DestinationWorker(self, key)
                    worker.start()
            if worker.offer(job):
                handed += 1
        return handed

    def idle(self) -> bool:
        """Whether no delivery is queued or in flight."""
        with self._lock:
            return all(worker.idle() for worker in self._workers.values())

    def deliver(self, job, destination: tuple[str, str, int]) -> None:
        """Send the job's result objects to the destination; record the outcome."""
        job_id = job.id
        try:
            keys = self.store.object_keys(job)  # name -> key
            if not keys:
                raise RuntimeError("the job has no result objects")
            objects = [self.store.read(keys[name]) for name in sorted(keys)]
            send_objects(objects, destination, calling_ae=self.config.ae_title,
                         connect_timeout_s=self.config.connect_timeout_s,
                         network_timeout_s=self.config.network_timeout_s, max_pdu=self.config.max_pdu)
        except Exception as error:
            attempt = int((job.delivery or {}).get("attempts") or 0) + 1
            delay = backoff_s(attempt, self.config.retry_base_s, self.config.retry_max_s)
            LOGGER.warning("delivery of job %s to %s@%s:%d failed (attempt %d, retry in %.0f s): %s",
                           job_id, destination[0], destination[1], destination[2], attempt, delay, error)
            try:
                self.store.delivery_failed(job, f"{type(error).__name__}: {error}", time.time() + delay)
            except Exception:
                LOGGER.exception("recording the failed delivery of job %s failed", job_id)
            return
        self.store.delivered(job)
        LOGGER.info("job %s delivered to %s@%s:%d", job_id, *destination)


class _DestinationWorker:
    """One thread per destination: its jobs go one after another; others do not wait."""

    def __init__(self, server: DimseServer, destination: tuple[str, str, int]):
        self.server = server
        self.destination = destination
        self._queue: queue.Queue = queue.Queue()
        self._pending: set[str] = set()  # job ids queued or in flight
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"dimse-deliver-{destination[0]}@{destination[1]}:{destination[2]}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def idle(self) -> bool:
        with self._lock:
            return not self._pending

    def offer(self, job) -> bool:
        job_id = job.id
        with self._lock:
            if job_id in self._pending:
                return False
            self._pending.add(job_id)
        self._queue.put((job_id, job))
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job_id, job = item
            try:
                if not self.server._stop.is_set():
                    self.server.deliver(job, self.destination)
            except Exception:
                LOGGER.exception("delivery worker for %s failed on job %s", self.destination, job_id)
            finally:
                with self._lock:
                    self._pending.discard(job_id)


def send_objects(objects: Iterable[bytes], destination: tuple[str, str, int], *, calling_ae: str,
                 connect_timeout_s: float = 10.0, network_timeout_s: float = 60.0,
                 max_pdu: int = 262144) -> None:
    """C-STORE Part-10 objects to ``(ae_title, host, port)`` on one association.

    Raises ``ConnectionError`` when the association fails and ``RuntimeError`` when a
    C-STORE is refused or gets no answer; success and warning statuses count as stored.
    """
    datasets = [pydicom.dcmread(io.BytesIO(body)) for body in objects]
    if not datasets:
        return
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = max_pdu
    ae.connection_timeout = connect_timeout_s
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = network_timeout_s
    contexts: dict[str, list[str]] = {}
    for dataset in datasets:
        syntaxes = contexts.setdefault(str(dataset.SOPClassUID), [])
        for syntax in (str(dataset.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if syntax not in syntaxes:
                syntaxes.append(syntax)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    ae_title, host, port = destination
    assoc = ae.associate(host, int(port), ae_title=ae_title)
    if not assoc.is_established:
        state = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise ConnectionError(f"association with {ae_title}@{host}:{port} {state}")
    try:
        for dataset in datasets:
            status = assoc.send_c_store(dataset)
            code = getattr(status, "Status", None)
            if code is None:
                raise RuntimeError(f"no C-STORE response for {dataset.SOPInstanceUID} (timeout or abort)")
            if int(code) not in STORE_SUCCESS_STATUSES:
                raise RuntimeError(f"C-STORE of {dataset.SOPInstanceUID} refused with status 0x{int(code):04X}")
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()


def _status(code: int, comment: str) -> tuple[int, Dataset] | int:
    """A C-STORE status with Error Comment (0000,0902, at most 64 characters)."""
    if code == SUCCESS:
        return SUCCESS
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


# --- entry point -------------------------------------------------------------------------


def run(settings=None, registry: _Registry | None = None, store: _JobStore | None = None,
        stop: threading.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM / SIGINT when run in the main thread).

    Settings used: ``bind_host`` and the ``dimse_*`` fields (:attr:`DimseOptions.SETTINGS_FIELDS`).
    Unless given, the tenants come from ``load_tenants(settings.tenants_file, settings.profile,
    settings.demo_tenants)`` and the job store from ``worker.job_store(settings)``.
    """
    if settings is None:
        from mosmedai.config import Settings

        settings = Settings()
    if registry is None:
        from mosmedai.ingress.tenants import load_tenants

        registry = load_tenants(settings.tenants_file or None, settings.profile, settings.demo_tenants)
    if store is None:
        from mosmedai.jobs.store import job_store

        store = job_store(settings)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    server = DimseServer(registry, store, DimseOptions.from_settings(settings)).start()
    try:
        stop.wait()
    finally:
        server.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    run()


if __name__ == "__main__":
    main()
