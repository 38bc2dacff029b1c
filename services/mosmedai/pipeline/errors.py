"""The domain errors: what the study service and the layers below raise, and every door maps to
its own protocol (HTTP status and JSON body, gRPC status and details, DIMSE status).

- ``InputError``: the request is refused for what it is (bad DICOM, unknown tool, too large,
  not the tenant's study, storage unavailable, ...): ``status`` is the HTTP status that says why
  and ``code`` a stable machine-readable reason.
- ``ToolsFailed``: tools failed in Triton, or the study was refused under load.
- ``Refused``: the admission gate or a draining replica refused the study before any work
  (503 overloaded/draining, 429 fair_share), always with a Retry-After.
"""

from __future__ import annotations


class InputError(Exception):
    """A request the platform refuses, with the HTTP status that says why."""

    def __init__(self, status: int, code: str, message: str, **details):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def as_json(self) -> dict:
        body = {"error": self.code, "detail": self.message}
        body.update(self.details)
        return body


class ToolsFailed(Exception):
    """Tools failed, or the study was refused under load; ``status`` is the HTTP status to
    answer: 502 or 504 (failed in Triton), 503 (unavailable, or ``reason`` overloaded /
    retry_budget) or 429 (``reason`` fair_share). 503 and 429 carry ``retry_after_s``."""

    def __init__(self, failures: dict[str, dict]):
        self.failures = failures
        refused = [out for out in failures.values() if out.get("reason")]
        # A refusal answers for the whole study (nothing else of it ran); else the worst failure.
        worst = refused[0] if refused else max(failures.values(), key=lambda out: out["status"])
        self.status = worst["status"]
        self.reason = worst.get("reason")
        self.retry_after_s = int(worst.get("retry_after_s", 1 if self.status in (429, 503) else 0))
        self.detail = worst["error"] if refused else "; ".join(f"{tool}: {out['error']}" for tool, out in failures.items())
        super().__init__(self.detail)

    @property
    def transient(self) -> bool:
        return self.status in (429, 503, 504)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.status in (429, 503) else {}

    def as_json(self) -> dict:
        if self.reason:
            return {"error": self.reason, "detail": self.detail, "retry_after_s": self.retry_after_s}
        return {"error": "tool_failed", "detail": self.detail, "tools": sorted(self.failures)}


class Refused(Exception):
    """Refused before any work: 503 ``overloaded`` or ``draining``, 429 ``fair_share``; the
    client comes back after ``retry_after_s`` (an int, seconds)."""

    def __init__(self, status: int, reason: str, detail: str, retry_after_s: int, close: bool = False):
        super().__init__(detail)
        self.status, self.reason, self.detail, self.retry_after_s = status, reason, detail, retry_after_s
        self.close = close  # the client should reconnect (a draining replica: the next one is elsewhere)

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after_s)}
        if self.close:
            headers["Connection"] = "close"
        return headers

    def as_json(self) -> dict:
        return {"error": self.reason, "detail": self.detail, "retry_after_s": self.retry_after_s}
