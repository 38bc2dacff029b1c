"""Results back to a tenant's PACS by DIMSE C-STORE (SCU): every finished job with a reply-to
address (the DICOM outbox of the job store) goes to its destination, one worker thread per
destination (an outage of one never delays another), retried with exponential backoff."""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from typing import Iterable

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from mosmedai.ingress.dimse_checks import STORE_SUCCESS_STATUSES

LOGGER = logging.getLogger("mosmedai.ingress.dimse")


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before retry number ``attempt`` (1 = after the first failure): base * 2^(n-1)."""
    return min(max_s, base_s * (2 ** max(0, attempt - 1)))




class ResultDelivery:
    """Hands due undelivered jobs to their destination's worker and records each outcome in the
    job store (``delivered`` / ``delivery_failed``). ``config``: the door's DimseOptions."""

    def __init__(self, store, config, stop: threading.Event):
        self.store, self.config, self._stop = store, config, stop
        self._lock = threading.Lock()
        self._workers: dict[tuple[str, str, int], _DestinationWorker] = {}

    def stop(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.join(timeout=self.config.network_timeout_s)

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

    def __init__(self, server: ResultDelivery, destination: tuple[str, str, int]):
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


