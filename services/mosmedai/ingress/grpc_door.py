"""The gRPC door on port 9000, served by each gateway replica beside its HTTP door.

- ``mosmedai.v1.Studies`` (``mosmedai/ingress/grpc_api/studies.proto``): DICOM bytes in, results
  out; a thin adapter over the replica's study service (``mosmedai.studies.service``), so limits,
  tenancy, admission and persistence are the same as over HTTP, with no hop in between.
- ``inference.GRPCInferenceService``: the Open Inference Protocol passed through to Triton
  (``mosmedai.ingress.grpc_oip``).

Every call but ServerLive/ServerReady carries ``authorization: Bearer <tenant token>``. The
domain errors map to gRPC status codes (``GRPC_CODE``, by the HTTP status each carries); a
refusal under load (429, 503) carries ``retry-after`` and ``grpc-retry-pushback-ms`` in the
trailing metadata. Several replicas on one host share the port (SO_REUSEPORT).
"""

from __future__ import annotations

import logging
import time

import grpc
from google.protobuf import json_format

from mosmedai.ingress.grpc_api import studies_pb2, studies_pb2_grpc
from mosmedai.ingress.grpc_oip import OipProxy, bearer
from mosmedai.pipeline.errors import InputError, Refused, ToolsFailed
from mosmedai.studies.intake import Origin
from mosmedai.studies.service import StudyOptions, job_status

log = logging.getLogger("mosmedai.ingress.grpc_door")

#: HTTP status of a domain error -> gRPC status.
GRPC_CODE = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS, 413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    502: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
SERVICE = "/mosmedai.v1.Studies/"


def grpc_status(error: Exception) -> tuple[grpc.StatusCode, str, tuple]:
    """(code, details, trailing metadata) of one domain error."""
    if isinstance(error, InputError):
        body, retry_after = error.as_json(), None
    elif isinstance(error, (ToolsFailed, Refused)):
        body, retry_after = error.as_json(), error.headers().get("Retry-After")
    else:
        raise TypeError(f"not a domain error: {error!r}")
    detail = body.get("detail") or body.get("error")
    trailers = ()
    if retry_after and error.status in (429, 503):  # a refusal under load says when to come back, as over HTTP
        trailers = (("retry-after", retry_after), ("grpc-retry-pushback-ms", str(int(retry_after) * 1000)))
    return GRPC_CODE.get(error.status, grpc.StatusCode.UNKNOWN), f"{body['error']}: {detail}", trailers


class StudiesService(studies_pb2_grpc.StudiesServicer):
    """``mosmedai.v1.Studies`` over the study service of this replica."""

    def __init__(self, studies):
        self.studies = studies

    async def _call(self, context, method: str, work):
        """Authenticate, run ``work(tenant)``, map a domain error; count the call as the HTTP door
        counts its requests (gRPC is an HTTP/2 POST)."""
        started, status = time.perf_counter(), 200
        tenant = None
        try:
            tenant = self.studies.tenants.by_token(bearer(context) or "")
            if tenant is None:
                status = 401
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated: missing or unknown bearer "
                                    "token (metadata `authorization: Bearer <tenant token>`)")
            return await work(tenant)
        except (InputError, ToolsFailed, Refused) as error:
            status = error.status
            if isinstance(error, InputError):
                self.studies.metrics.rejected_input(tenant, error.code)
            code, details, trailers = grpc_status(error)
            if trailers:
                context.set_trailing_metadata(trailers)
            await context.abort(code, details)
        finally:
            self.studies.metrics.observe_request(SERVICE + method, "POST", status, time.perf_counter() - started)

    def _origin(self, context) -> Origin:
        return Origin("grpc", context.peer() or "")

    async def _submit(self, request, context, asynchronous: bool):
        if not request.instances:
            raise InputError(400, "no_instances", "instances: send at least one DICOM file")
        options = StudyOptions(tools=list(request.tools) or None, asynchronous=asynchronous,
                               idempotency_key=(request.idempotency_key or None) if asynchronous else None,
                               origin=self._origin(context))
        return options

    async def Submit(self, request, context):
        async def work(tenant):
            options = await self._submit(request, context, asynchronous=False)
            answer = await self.studies.submit(tenant, list(request.instances), options)
            return json_format.ParseDict(answer.all().model_dump(mode="json"), studies_pb2.StudyResults(),
                                         ignore_unknown_fields=True)
        return await self._call(context, "Submit", work)

    async def SubmitAsync(self, request, context):
        async def work(tenant):
            options = await self._submit(request, context, asynchronous=True)
            job = await self.studies.submit(tenant, list(request.instances), options)
            return json_format.ParseDict(job_status(job), studies_pb2.StudyStatus(), ignore_unknown_fields=True)
        return await self._call(context, "SubmitAsync", work)

    async def GetStudy(self, request, context):
        async def work(tenant):
            if not request.study_instance_uid:
                raise InputError(400, "no_study_uid", "study_instance_uid is empty")
            status = await self.studies.status(tenant, request.study_instance_uid)
            return json_format.ParseDict(status, studies_pb2.StudyStatus(), ignore_unknown_fields=True)
        return await self._call(context, "GetStudy", work)


class GrpcDoor:
    """The gRPC server of one gateway replica, on its event loop."""

    def __init__(self, studies, settings):
        self.studies, self.settings = studies, settings
        self.server: grpc.aio.Server | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        settings = self.settings
        limits = [("grpc.max_receive_message_length", settings.max_body_bytes),
                  ("grpc.max_send_message_length", settings.max_body_bytes)]
        self.channel = grpc.aio.insecure_channel(settings.triton_grpc_target, options=limits)
        # SO_REUSEPORT: the replicas of a host (and a restart's new one beside the old) share the port.
        server = grpc.aio.server(options=limits + [("grpc.so_reuseport", 1)])
        server.add_generic_rpc_handlers([OipProxy(self.channel, settings.enabled_tools, self.studies.tenants,
                                                  settings.tool_versions,
                                                  choices=lambda: self.studies.tool_choice.current)])
        studies_pb2_grpc.add_StudiesServicer_to_server(StudiesService(self.studies), server)
        address = f"{settings.bind_host}:{settings.grpc_port}"
        if server.add_insecure_port(address) == 0:
            log.error("gRPC: cannot listen on %s; the gRPC door is closed in this replica", address)
            return
        await server.start()
        self.server = server
        log.info("gRPC listening on %s (Triton %s)", address, settings.triton_grpc_target)

    async def stop(self, grace_s: float) -> None:
        """New calls are refused at once; those in flight get ``grace_s`` to finish."""
        if self.server is not None:
            await self.server.stop(grace=grace_s)
        if self.channel is not None:
            await self.channel.close()
