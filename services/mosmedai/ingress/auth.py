"""Who calls the HTTP door: every request outside ``PUBLIC_PATHS`` carries the bearer token of
a tenant (``mosmedai.ingress.tenants``), and is counted by route, method and status."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse

from mosmedai.ingress.metrics import gateway_metrics
from mosmedai.ingress.tenants import installed_registry
from mosmedai.pipeline.errors import InputError
from mosmedai.studies.intake import Origin

#: Paths anyone may call: probes, metrics and the API description.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc",
                          "/docs/oauth2-redirect", "/v2/health/live", "/v2/health/ready"})


class RequestMetricsMiddleware:
    """Counts every answered request by route template, method and status (pure ASGI: no
    body buffering, one dict lookup and one histogram observation per request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        metrics = gateway_metrics()  # set by the Gateway replica (one per process)
        if scope["type"] != "http" or metrics is None:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        code = 500

        async def send_and_note(message):
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics.observe_request(endpoint, scope["method"], code, time.perf_counter() - started)


class TenantAuthMiddleware:
    """Every request outside PUBLIC_PATHS carries `Authorization: Bearer <token>` of a tenant;
    the tenant goes into the ASGI scope (``scope["mosmedai.tenant"]``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        tenants = installed_registry()
        if tenants is None:  # fail closed: no registry yet, nobody is let in
            answer = JSONResponse({"error": "not_ready", "detail": "the tenant registry is not loaded yet"}, 503)
            return await answer(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        tenant = tenants.by_token(token) if token else None
        if tenant is None:
            detail = ("an `Authorization: Bearer <token>` header is required" if token is None
                      else "the bearer token is not one of a tenant")
            answer = JSONResponse({"error": "unauthenticated", "detail": detail}, status_code=401,
                                  headers={"WWW-Authenticate": 'Bearer realm="mosmedai"'})
            return await answer(scope, receive, send)
        scope["mosmedai.tenant"] = tenant
        return await self.app(scope, receive, send)


def tenant_of(request: Request):
    return request.scope["mosmedai.tenant"]


#: The replica's study service and its keep-going hook (one gateway replica per process).
_replica: dict = {}


def install_studies(service, keep_going) -> None:
    """Called by the gateway replica at start: the study service every HTTP route adapts to, and
    the hook that keeps its background work (job runner, watchers, gRPC door) going."""
    _replica.update(studies=service, keep_going=keep_going)


def studies_of(request: Request):
    """The replica's study service (``mosmedai.studies.service.StudyService``)."""
    service = _replica.get("studies")
    if service is None:
        raise InputError(503, "not_ready", "the gateway is starting")
    return service


def keep_going() -> None:
    _replica["keep_going"]()


def origin_of(request: Request, door: str):
    client = request.client
    return Origin(door, f"{client.host}:{client.port}" if client else "")
