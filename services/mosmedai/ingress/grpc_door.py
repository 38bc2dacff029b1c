"""The gRPC front door on port 9000: the Open Inference Protocol and the study service.

- ``inference.GRPCInferenceService`` (KServe v2 / Triton): passed through to the region's
  Triton pool as bytes, so a stock ``tritonclient.grpc`` client works unchanged, streaming
  included. Only the tools the caller's region (or tenant) has enabled are reachable, at their
  live version (``mosmedai.catalog.tool_config``, re-read when its file changes); repository control, shared memory, trace and
  log settings are refused (clients do not manage the pool).
- ``mosmedai.v1.Studies`` (``mosmedai/grpc_api/studies.proto``): DICOM bytes in, results
  out; a thin adapter over the gateway's HTTP study API, so limits, tenancy and
  persistence are the gateway's.

Every call but ServerLive/ServerReady carries ``authorization: Bearer <tenant token>``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import grpc
import httpx
from google.protobuf import json_format
from tritonclient.grpc import service_pb2

from mosmedai.catalog.tools import CATALOG
from mosmedai.config import Settings
from mosmedai.ingress.grpc_api import studies_pb2, studies_pb2_grpc
from mosmedai.ingress.tenants import TenantRegistry, load_tenants
from mosmedai.pipeline.multipart import multipart_body

log = logging.getLogger("mosmedai.grpc")

OIP_SERVICE = "/inference.GRPCInferenceService/"
#: Methods anyone may call (probes), like /healthz over HTTP.
UNAUTHENTICATED = frozenset({"ServerLive", "ServerReady"})
#: Methods naming one model, with the request type to read the name from.
MODEL_METHODS = {
    "ModelInfer": (service_pb2.ModelInferRequest, "model_name"),
    "ModelMetadata": (service_pb2.ModelMetadataRequest, "name"),
    "ModelReady": (service_pb2.ModelReadyRequest, "name"),
    "ModelConfig": (service_pb2.ModelConfigRequest, "name"),
    "ModelStatistics": (service_pb2.ModelStatisticsRequest, "name"),
}
#: The version field of each of those requests.
VERSION_FIELDS = {"ModelInfer": "model_version"}
SERVER_METHODS = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})

#: HTTP status of the gateway -> gRPC status.
GRPC_CODE = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS, 413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    502: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def bearer(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
    return None


class OipProxy(grpc.GenericRpcHandler):
    """Bytes in, bytes out to Triton: nothing re-encoded on the way, except a request for a
    tool that runs a version other than 1, or that names a version: a tool version is its own
    ensemble (``ToolSpec.ensemble``), so the model name is rewritten to it."""

    def __init__(self, channel: grpc.aio.Channel, enabled: list[str], tenants: TenantRegistry,
                 tool_versions: dict[str, int] | None = None, choices=None):
        self.channel, self.enabled, self.tenants = channel, set(enabled), tenants
        self.tool_versions = dict(tool_versions or {})
        self.choices = choices  # () -> ToolChoices in force (mosmedai.catalog.tool_config); None: every served tool

    def service(self, details):
        if not details.method.startswith(OIP_SERVICE):
            return None
        name = details.method[len(OIP_SERVICE):]
        if name == "ModelStreamInfer":
            return grpc.stream_stream_rpc_method_handler(self._stream(details.method))
        return grpc.unary_unary_rpc_method_handler(self._unary(details.method, name))

    async def _check(self, name: str, request: bytes | None, context) -> bytes | None:
        """The request to forward (the same bytes unless a tool version's ensemble is named)."""
        tenant = None if name in UNAUTHENTICATED else self.tenants.by_token(bearer(context))
        if name not in UNAUTHENTICATED and tenant is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token "
                                "(metadata `authorization: Bearer <tenant token>`)")
        if name in SERVER_METHODS:
            return request
        if name not in MODEL_METHODS:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{name} is not offered: the platform manages its Triton pools")
        message_type, field = MODEL_METHODS[name]
        try:
            message = message_type.FromString(request)
            model = getattr(message, field)
        except Exception:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: the request does not parse")
        enabled, live = self.enabled, self.tool_versions
        if self.choices is not None and tenant is not None:
            view = self.choices().view_of(tenant)
            enabled, live = set(view.enabled), view.versions
        if model not in enabled:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown model '{model}'; enabled: {sorted(enabled)}")
        version_field = VERSION_FIELDS.get(name, "version")
        asked = getattr(message, version_field)
        spec = CATALOG[model]
        if asked and (not (asked.isascii() and asked.isdigit()) or int(asked) not in spec.versions):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model '{model}' has no version {asked}; versions: {list(spec.versions)}")
        version = int(asked) if asked else live.get(model, 1)
        if version == 1 and not asked:
            return request  # version 1's ensemble is the tool's name: forward the bytes as they came
        setattr(message, field, spec.ensemble(version))
        setattr(message, version_field, "")  # the ensemble's own (only) version
        return message.SerializeToString()

    def _unary(self, method: str, name: str):
        call = self.channel.unary_unary(method)

        async def forward(request: bytes, context) -> bytes:
            request = await self._check(name, request, context)
            try:
                return await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), error.details() or "")

        return forward

    def _stream(self, method: str):
        call = self.channel.stream_stream(method)

        async def forward(requests, context):
            async def checked():
                async for request in requests:
                    yield await self._check("ModelInfer", request, context)

            try:
                async for response in call(checked()):
                    yield response
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), error.details() or "")

        return forward


class StudiesService(studies_pb2_grpc.StudiesServicer):
    def __init__(self, gateway: httpx.AsyncClient):
        self.gateway = gateway

    async def _call(self, context, method: str, path: str, **kwargs) -> dict:
        token = bearer(context)
        headers = dict(kwargs.pop("headers", {}))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            answer = await self.gateway.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"gateway unreachable: {error}")
        body = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
        if answer.status_code >= 400:
            detail = body.get("detail") or body.get("error") or answer.text[:500]
            retry_after = answer.headers.get("retry-after", "")
            if retry_after.isdigit():  # a refusal under load says when to come back, as over HTTP
                context.set_trailing_metadata((("retry-after", retry_after),
                                               ("grpc-retry-pushback-ms", str(int(retry_after) * 1000))))
            await context.abort(GRPC_CODE.get(answer.status_code, grpc.StatusCode.UNKNOWN),
                                f"{body.get('error', answer.status_code)}: {detail}")
        return body

    async def _submit(self, request, context, asynchronous: bool) -> dict:
        if not request.instances:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "instances: send at least one DICOM file")
        body, content_type = multipart_body(list(request.instances))
        headers = {"Content-Type": content_type}
        if asynchronous:
            headers["Prefer"] = "respond-async"
            if request.idempotency_key:
                headers["Idempotency-Key"] = request.idempotency_key
        params = {"tools": ",".join(request.tools)} if request.tools else None
        return await self._call(context, "POST", "/v1/studies", content=body, headers=headers, params=params)

    async def Submit(self, request, context):
        results = await self._submit(request, context, asynchronous=False)
        return json_format.ParseDict(results, studies_pb2.StudyResults(), ignore_unknown_fields=True)

    async def SubmitAsync(self, request, context):
        status = await self._submit(request, context, asynchronous=True)
        return json_format.ParseDict(status, studies_pb2.StudyStatus(), ignore_unknown_fields=True)

    async def GetStudy(self, request, context):
        if not request.study_instance_uid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "study_instance_uid is empty")
        status = await self._call(context, "GET", f"/v1/studies/{request.study_instance_uid}")
        return json_format.ParseDict(status, studies_pb2.StudyStatus(), ignore_unknown_fields=True)


def tool_choice_watcher(settings: Settings, tenants: TenantRegistry):
    """The per-region tool choice, re-read when its file changes. The gateway's router loads
    newly live versions; this process only waits until its Triton has them before switching."""
    from prometheus_client import CollectorRegistry

    from mosmedai.catalog import tool_config
    from mosmedai.jobs.store import object_store
    from mosmedai.serving.pools import directory_for

    regions = {t.id: t.region for t in tenants.all()}
    # the gateway's gate, so that this door never serves a version the gateway would refuse
    admitted = tool_config.admission_gate(object_store(settings), settings.results_bucket)
    directory = directory_for(settings) if settings.pool_discovery == "config" else None
    client = None

    async def loaded(choices) -> None:
        nonlocal client
        import tritonclient.grpc.aio as triton

        if client is None:
            client = triton.InferenceServerClient(settings.triton_grpc_target)
        deadline = asyncio.get_running_loop().time() + 60.0
        for tool, versions in choices.live().items():
            if not await client.is_model_ready(CATALOG[tool].ensemble(settings.tool_version(tool))):
                continue  # this Triton does not serve the tool at all
            for version in versions:
                while not await client.is_model_ready(CATALOG[tool].ensemble(version)):
                    if asyncio.get_running_loop().time() > deadline:
                        raise RuntimeError(f"{CATALOG[tool].ensemble(version)} is not loaded in {settings.triton_grpc_target}")
                    await asyncio.sleep(0.5)

    return tool_config.ConfigWatcher(
        tool_config.source_path(settings.tools_config) if settings.tools_config.strip() else None,
        tool_config.load(settings, regions, directory, admitted),
        lambda text: tool_config.parse_text(text, settings, regions, directory, admitted),
        loaded, settings.tools_config_poll_s, tool_config.ReloadMetrics(CollectorRegistry()))


async def serve(settings: Settings) -> None:
    tenants = load_tenants(settings.tenants_file or None, settings.profile, settings.demo_tenants)
    limits = [("grpc.max_receive_message_length", settings.max_body_bytes),
              ("grpc.max_send_message_length", settings.max_body_bytes)]
    channel = grpc.aio.insecure_channel(settings.triton_grpc_target, options=limits)
    gateway = httpx.AsyncClient(base_url=settings.gateway_base,
                                timeout=settings.study_timeout_s)
    server = grpc.aio.server(options=limits)
    watcher = tool_choice_watcher(settings, tenants)
    server.add_generic_rpc_handlers([OipProxy(channel, settings.enabled_tools, tenants, settings.tool_versions,
                                              choices=lambda: watcher.current)])
    studies_pb2_grpc.add_StudiesServicer_to_server(StudiesService(gateway), server)
    address = f"{settings.bind_host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"gRPC: cannot listen on {address}")
    await server.start()
    watcher.start()
    log.info("gRPC listening on %s (Triton %s)", address, settings.triton_grpc_target)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=5)
    await channel.close()
    await gateway.aclose()


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(Settings()))


if __name__ == "__main__":
    main()
