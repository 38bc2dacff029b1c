"""DICOM DIMSE interface: C-ECHO / C-STORE SCP in, C-STORE SCU out (issue 4).

Inbound: a pynetdicom acceptor on ``dimse_port`` (11112). The *called* AE title picks the
tenant (:meth:`TenantRegistry.by_called_ae`); an unknown one is rejected (rejected-permanent,
service-user, reason 7 "called AE title not recognised"), and a *calling* AE title outside
the tenant's ``allowed_calling_aes`` is rejected with reason 3 ("calling AE title not
recognised"). Storage contexts are offered for the SOP classes the platform reads (CR, DX
for presentation / for processing, Digital Mammography for presentation, CT Image) in the
common uncompressed and compressed transfer syntaxes; any other SOP class is refused at
presentation-context negotiation, and a C-STORE naming another SOP class gets 0x0122.

Each instance is checked (``dimse_checks``), stored by the study service's durable intake
(``mosmedai.studies.intake``) and only then acknowledged (0x0000). Statuses (PS3.4 B.2.3):

* 0xA900 the data set does not match the SOP class (SOP Class / Instance UID differ from the
  request's, Modality not one the IOD allows, Rows / Columns / Pixel Data or a UID missing);
* 0xC000 the data set cannot be parsed;
* 0xA700 out of resources: the instance could not be persisted (object store down);
* 0x0122 SOP class not supported; 0x0110 anything unexpected (a bug here, not the sender's).

Two background threads: *series completion* turns series with no new instance for
``series_quiet_s`` into jobs (``reply_to`` = the tenant's result destination), and *result
delivery* (``dimse_delivery``) sends the SR / SC objects of finished jobs back by C-STORE.

Run with ``python -m mosmedai.ingress.dimse`` (reads :class:`mosmedai.config.Settings`, see
:meth:`DimseOptions.from_settings` for the fields).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, fields
from typing import Protocol

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from mosmedai.ingress.dimse_checks import (  # noqa: F401 (the door's statuses and checks, used by its tests)
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    REASON_CALLED_AE_NOT_RECOGNISED,
    REASON_CALLING_AE_NOT_RECOGNISED,
    REJECTED_PERMANENT,
    SERVICE_USER,
    SOP_CLASS_NOT_SUPPORTED,
    STORAGE_SOP_CLASSES,
    STORAGE_TRANSFER_SYNTAXES,
    SUCCESS,
    _Refused,
    _status,
    check_instance,
    dimse_status,
)
from mosmedai.ingress.dimse_delivery import ResultDelivery, backoff_s, send_objects  # noqa: F401 (API)
from mosmedai.pipeline.errors import InputError
from mosmedai.studies.intake import Origin, StudyIntake

LOGGER = logging.getLogger("mosmedai.ingress.dimse")

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
        # Instances and series go into the study service's durable intake (as every door's do).
        self.intake = StudyIntake(store)
        base = options or DimseOptions()
        self.config = DimseOptions(**{f.name: overrides.get(f.name, getattr(base, f.name))
                                     for f in fields(DimseOptions)})
        unknown = set(overrides) - {f.name for f in fields(DimseOptions)}
        if unknown:
            raise TypeError(f"unknown DimseServer options: {sorted(unknown)}")
        self._server: ThreadedAssociationServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.delivery = ResultDelivery(store, self.config, self._stop)
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
        for thread in self._threads:
            thread.join(timeout=self.config.network_timeout_s)
        self.delivery.stop()

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
        origin = Origin("dimse", f"{event.assoc.requestor.address}:{event.assoc.requestor.port}",
                        event.assoc.requestor.ae_title)
        try:
            self.intake.receive_instance(tenant.id, part10, str(dataset.StudyInstanceUID),
                                         str(dataset.SeriesInstanceUID), sop_instance, origin)
        except InputError as error:
            return _status(dimse_status(error), error.message)
        return SUCCESS

    # ---- series completion

    def complete_series(self, now: float | None = None) -> list:
        """One pass: every quiet pending series becomes a job. Returns the jobs."""
        return self.intake.complete_quiet_series(self.config.series_quiet_s, self._reply_to, now=now)

    def _reply_to(self, series) -> dict | None:
        tenant = self.registry.get(series.tenant)
        destination = tenant.dimse.result_destination if tenant is not None and tenant.dimse else None
        if destination is None:
            return None
        return {"ae_title": destination.ae_title, "host": destination.host, "port": int(destination.port)}

    # ---- result delivery (mosmedai.ingress.dimse_delivery)

    def dispatch_deliveries(self, now: float | None = None) -> int:
        return self.delivery.dispatch_deliveries(now)

    def idle(self) -> bool:
        return self.delivery.idle()

    def deliver(self, job, destination: tuple[str, str, int]) -> None:
        self.delivery.deliver(job, destination)


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
