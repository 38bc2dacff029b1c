"""The HTTP study API: ``POST /v1/studies`` (one DICOM file, or several as multipart/related;
synchronous, or accepted as a job with ``Prefer: respond-async``), a study's status, and its
result objects (``/sr``, ``/sc``). A thin adapter over the study service."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mosmedai.ingress.auth import origin_of, studies_of, tenant_of
from mosmedai.ingress.http_body import read_body
from mosmedai.pipeline.errors import InputError
from mosmedai.pipeline.multipart import (
    DICOM_MEDIA_TYPE,
    MULTIPART_RELATED,
    multipart_body,
    multipart_parts,
)
from mosmedai.results.schemas import ErrorBody, StudyResult, StudyResults, StudyStatus
from mosmedai.studies.service import StudyOptions, job_status, parse_versions

router = APIRouter()


def study_deadline_s(prefer: str, default_s: float) -> float:
    """The synchronous deadline: ``Prefer: wait=N`` (RFC 7240, seconds) may ask for less than
    the configured default, never more."""
    for token in prefer.split(","):
        name, _, value = token.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                seconds = -1.0
            if not 0 < seconds < 1e9:
                raise InputError(400, "bad_prefer_wait", f"Prefer: wait={value.strip()!r} is not a positive number of "
                                 "seconds (RFC 7240)")
            return min(seconds, default_s)
    return default_s


def instances_of(parts: list[tuple[str, bytes]], limit: int) -> list[bytes]:
    """The payloads of a multipart/related body, every part one DICOM file."""
    if len(parts) > limit:
        raise InputError(413, "too_many_instances", f"{len(parts)} instances in one request; the limit is "
                         f"{limit} (max_instances_per_request)")
    wrong = [index + 1 for index, (part_type, _) in enumerate(parts) if part_type != DICOM_MEDIA_TYPE]
    if wrong:
        raise InputError(415, "unsupported_media_type",
                         f"parts {wrong[:10]} are not {DICOM_MEDIA_TYPE}; every part must be one DICOM file")
    return [payload for _, payload in parts]


@router.post(
    "/v1/studies",
    response_model=StudyResult | StudyResults,
    summary="Run every enabled tool that reads these instances",
    description="Body: one DICOM Part-10 file (`Content-Type: application/dicom`; answer: StudyResult), "
    "or several (`multipart/related; type=\"application/dicom\"`, as DICOMweb STOW-RS; answer: "
    "StudyResults). Instances are grouped by series; CT tools read a whole series ordered by Image "
    "Position (Patient). Optional query `tools=a,b` restricts the run to those tools; `versions=a:2` runs "
    "version 2 of tool a instead of the deployment's (any version the tool has and Triton has loaded; "
    "`mosmedai tools admit` runs a candidate version this way; 409 when that version is not loaded).",
    responses={code: {"model": ErrorBody} for code in (400, 409, 413, 415, 422, 429, 502, 503, 504)},
    openapi_extra={"requestBody": {"required": True, "content": {
        DICOM_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        MULTIPART_RELATED: {"schema": {"type": "string", "format": "binary"}}}}},
)
async def submit_study(request: Request, tools: str | None = None, versions: str | None = None) -> JSONResponse:
    service, tenant = studies_of(request), tenant_of(request)
    settings = service.settings
    prefer = request.headers.get("prefer", "")
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type not in (DICOM_MEDIA_TYPE, MULTIPART_RELATED):
        raise InputError(415, "unsupported_media_type",
                         f"Content-Type is '{media_type or '(none)'}'; send one DICOM file as {DICOM_MEDIA_TYPE} "
                         f"or several as {MULTIPART_RELATED}; type=\"{DICOM_MEDIA_TYPE}\"")
    options = StudyOptions(
        tools=[name.strip() for name in tools.split(",") if name.strip()] if tools else None,
        versions=parse_versions(versions) if versions else None,
        deadline_s=study_deadline_s(prefer, settings.sync_deadline_s),
        asynchronous="respond-async" in [token.strip().lower() for token in prefer.split(",")],
        idempotency_key=request.headers.get("idempotency-key"),
        origin=origin_of(request, "http"))
    async with service.study(tenant, options) as ticket:
        if media_type == DICOM_MEDIA_TYPE and ticket.may_admit_early:
            await ticket.admit_early()  # judged before the body is read: the cheapest refusal there is
        body = await read_body(request, settings.max_body_bytes)
        read = time.perf_counter()
        bodies = ([body] if media_type == DICOM_MEDIA_TYPE
                  else instances_of(multipart_parts(body, content_type), settings.max_instances_per_request))
        answer = await ticket.run(bodies, read)
    if options.asynchronous:
        return JSONResponse(job_status(answer), status_code=202, headers={"Location": f"/v1/studies/{answer.study_uid}"})
    result = answer.single() if media_type == DICOM_MEDIA_TYPE else answer.all()
    return JSONResponse(result.model_dump(mode="json"))


@router.get("/v1/studies/{study_instance_uid}", response_model=StudyStatus,
            summary="Status of an accepted study, and its results when done",
            responses={code: {"model": ErrorBody} for code in (401, 403)})
async def study_status(study_instance_uid: str, request: Request) -> JSONResponse:
    return JSONResponse(await studies_of(request).status(tenant_of(request), study_instance_uid))


async def _objects(request: Request, study_instance_uid: str, kind: str) -> Response:
    payloads = await studies_of(request).objects(tenant_of(request), study_instance_uid, kind)
    if kind == "sr" and len(payloads) == 1:
        return Response(payloads[0], media_type=DICOM_MEDIA_TYPE)
    body, content_type = multipart_body(payloads)
    return Response(body, media_type=content_type)


@router.get("/v1/studies/{study_instance_uid}/sr", summary="The DICOM SR (TID 1500) of a done study",
            response_class=Response, responses={code: {"model": ErrorBody} for code in (401, 403, 409)})
async def study_sr(study_instance_uid: str, request: Request) -> Response:
    return await _objects(request, study_instance_uid, "sr")


@router.get("/v1/studies/{study_instance_uid}/sc",
            summary="The secondary-capture series of a done study (multipart/related)",
            response_class=Response, responses={code: {"model": ErrorBody} for code in (401, 403, 409)})
async def study_sc(study_instance_uid: str, request: Request) -> Response:
    return await _objects(request, study_instance_uid, "sc")
