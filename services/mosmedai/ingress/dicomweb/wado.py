"""WADO-RS (PS3.18 10.4): ``GET /dicomweb/studies/{study}[/series/{series}[/instances/{sop}]]``
answers multipart/related; type="application/dicom" of the Part-10 result objects, as stored
(Explicit VR Little Endian); ``.../metadata``: DICOM JSON without Pixel Data. A study, series or
instance the tenant has no result of is 404, whether or not another tenant has one (no
enumeration)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mosmedai.ingress.auth import studies_of, tenant_of
from mosmedai.ingress.dicomweb.media import (
    PREFIX,
    check_dicom_accept,
    dataset_format,
    datasets_response,
)
from mosmedai.ingress.dicomweb.qido import instances_of
from mosmedai.pipeline.errors import InputError
from mosmedai.pipeline.multipart import multipart_body
from mosmedai.results.result_index import ResultInstance

router = APIRouter(prefix=PREFIX, tags=["DICOMweb"])


async def _selected(request: Request, study: str, series: str | None, sop: str | None) -> list[ResultInstance]:
    instances, _ = await instances_of(request, study)
    if series is not None:
        instances = [instance for instance in instances if instance.series == series]
    if sop is not None:
        instances = [instance for instance in instances if instance.sop == sop]
    if not instances:
        what = f"study {study}" + (f", series {series}" if series else "") + (f", instance {sop}" if sop else "")
        raise InputError(404, "not_found", f"no result objects of {what} for this tenant")
    return instances


async def _retrieve(request: Request, study: str, series: str | None = None, sop: str | None = None) -> Response:
    tenant_of(request)
    check_dicom_accept(request.headers.get("accept"))
    instances = await _selected(request, study, series, sop)
    index = studies_of(request).index
    payloads = await asyncio.gather(*(asyncio.to_thread(index.read, instance.key) for instance in instances))
    body, content_type = multipart_body(list(payloads))
    return Response(body, media_type=content_type)


async def _metadata(request: Request, study: str, series: str | None = None, sop: str | None = None) -> Response:
    tenant_of(request)
    form = dataset_format(request.headers.get("accept"), multipart_xml=True)
    instances = await _selected(request, study, series, sop)
    return datasets_response([instance.header for instance in instances], form)


_WADO = dict(response_class=Response, responses={404: {"description": "no such result object of this tenant"}})


@router.get("/studies/{study}", summary="WADO-RS: the result objects of a study (multipart/related)", **_WADO)
async def retrieve_study(study: str, request: Request) -> Response:
    return await _retrieve(request, study)


@router.get("/studies/{study}/metadata", summary="WADO-RS: metadata of a study's result objects", **_WADO)
async def retrieve_study_metadata(study: str, request: Request) -> Response:
    return await _metadata(request, study)


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: the result objects of a series", **_WADO)
async def retrieve_series(study: str, series: str, request: Request) -> Response:
    return await _retrieve(request, study, series)


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: metadata of a result series",
            **_WADO)
async def retrieve_series_metadata(study: str, series: str, request: Request) -> Response:
    return await _metadata(request, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}", summary="WADO-RS: one result object", **_WADO)
async def retrieve_instance(study: str, series: str, sop: str, request: Request) -> Response:
    return await _retrieve(request, study, series, sop)


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata",
            summary="WADO-RS: metadata of one result object", **_WADO)
async def retrieve_instance_metadata(study: str, series: str, sop: str, request: Request) -> Response:
    return await _metadata(request, study, series, sop)
