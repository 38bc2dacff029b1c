"""The HTTP tools API: every tool with its versions and what is enabled and live for the caller
(``GET /v1/tools``), the caller's feedback and shadow agreement per version
(``GET /v1/tools/{tool}/quality``), and radiologists' feedback on a study
(``POST /v1/studies/{uid}/feedback``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mosmedai.ingress.auth import studies_of, tenant_of
from mosmedai.ingress.http_body import read_body
from mosmedai.pipeline.errors import InputError
from mosmedai.results import feedback
from mosmedai.results.schemas import (
    ErrorBody,
    Feedback,
    FeedbackIn,
    ToolQuality,
    ToolsAnswer,
)

router = APIRouter()


@router.post(
    "/v1/studies/{study_instance_uid}/feedback", response_model=Feedback, status_code=201,
    summary="A radiologist's verdict on one tool's result for one of the tenant's studies",
    description="201 when stored; 200 with the stored feedback when the same reviewer sends the same "
    "verdict, reason and comment again (counted once per study, tool and reviewer); 409 when that "
    "reviewer already sent something else (the first answer stands). 403 for a study the tenant was "
    "not answered (another tenant's, or none); 422 naming the field for a bad body, or when the tool "
    "did not run on the study. `reason` is required with verdict `disagree`, null otherwise.",
    responses={200: {"model": Feedback}, **{code: {"model": ErrorBody} for code in (400, 403, 409, 413, 415, 422)}},
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": FeedbackIn.model_json_schema()}}}},
)
async def give_feedback(study_instance_uid: str, request: Request) -> JSONResponse:
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise InputError(415, "unsupported_media_type", f"Content-Type is '{media_type}'; send the feedback "
                         "as application/json")
    body = await read_body(request, feedback.MAX_BODY_BYTES)
    stored, created = await studies_of(request).give_feedback(tenant_of(request), study_instance_uid, body)
    return JSONResponse(stored, status_code=201 if created else 200)


@router.get("/v1/tools/{tool}/quality", response_model=ToolQuality,
            summary="The tenant's feedback on a tool, per model version",
            description="Counts of the caller tenant's feedback on the tool per model version (in the "
            "tenant's region) and the disagreement rate; for a version that ran in shadow on the tenant's "
            "studies, its agreement with the live version (`shadow_agreement`).", responses={404: {"model": ErrorBody}})
async def tool_quality(tool: str, request: Request) -> JSONResponse:
    quality = await studies_of(request).tool_quality(tenant_of(request), tool)
    return JSONResponse(ToolQuality(**quality).model_dump(mode="json"))


@router.get("/v1/tools", response_model=ToolsAnswer,
            summary="Every tool, its versions, and what is enabled and live for the caller",
            description="`versions`: what the catalog and model repository hold, each with its model card and "
            "held-out evaluation summary. `enabled` and `live_version`: for the caller tenant (its region's "
            "choice, or its own override; mosmedai.catalog.tool_config), as of now.")
async def list_tools(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    answer = ToolsAnswer(tenant=tenant.id, region=tenant.region, tools=studies_of(request).tools(tenant))
    return JSONResponse(answer.model_dump(mode="json"))
