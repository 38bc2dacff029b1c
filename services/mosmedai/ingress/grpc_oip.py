"""The Open Inference Protocol (KServe v2 / Triton ``inference.GRPCInferenceService``) on the gRPC
door: passed through to the region's Triton pool as bytes, so a stock ``tritonclient.grpc``
client works unchanged, streaming included. Only the tools the caller's region (or tenant) has
enabled are reachable, at their live version (``mosmedai.catalog.tool_config``); repository
control, shared memory, trace and log settings are refused (clients do not manage the pool).
"""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2

from mosmedai.catalog.tools import CATALOG
from mosmedai.ingress.tenants import TenantRegistry

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
