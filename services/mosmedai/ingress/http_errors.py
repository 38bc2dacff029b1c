"""The HTTP door's mapping of the domain errors (``mosmedai.pipeline.errors``) to answers:
the status each error carries, a JSON body ``{"error": code, "detail": ...}``, and
Retry-After on every refusal under load (429, 503)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mosmedai.ingress.metrics import gateway_metrics
from mosmedai.pipeline.errors import InputError, Refused, ToolsFailed


def http_answer(error: Exception) -> JSONResponse:
    """The answer of one domain error (every door's mapping is tested against the same list)."""
    if isinstance(error, InputError):
        return JSONResponse(error.as_json(), status_code=error.status)
    if isinstance(error, (ToolsFailed, Refused)):
        return JSONResponse(error.as_json(), status_code=error.status, headers=error.headers())
    raise TypeError(f"not a domain error: {error!r}")


async def _input_error(request: Request, error: InputError) -> JSONResponse:
    metrics = gateway_metrics()
    if metrics is not None:
        metrics.rejected_input(request.scope.get("mosmedai.tenant"), error.code)
    return http_answer(error)


async def _refusal(request: Request, error: ToolsFailed | Refused) -> JSONResponse:
    return http_answer(error)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(ToolsFailed, _refusal)
    app.add_exception_handler(Refused, _refusal)
