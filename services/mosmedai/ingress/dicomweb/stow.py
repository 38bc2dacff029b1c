"""STOW-RS (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]`` with multipart/related;
type="application/dicom". Every part is decoded; a part that cannot be stored is named in the
Failed SOP Sequence with a Failure Reason (PS3.18 I.2.2) and the rest go on. The stored instances
of each study become one accepted job of the study service. 200: all stored, 202: some, 409: none.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass

import pydicom
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydicom.dataset import Dataset

from mosmedai.ingress.auth import origin_of, studies_of, tenant_of
from mosmedai.ingress.dicomweb.media import (
    PREFIX,
    base_url,
    dataset_format,
    dataset_response,
    parse_accept,
)
from mosmedai.ingress.http_body import read_body
from mosmedai.jobs.store import UID
from mosmedai.pipeline.dicom_input import DecodedImage, decode
from mosmedai.pipeline.errors import InputError
from mosmedai.pipeline.multipart import (
    DICOM_MEDIA_TYPE,
    MULTIPART_RELATED,
    multipart_parts,
)
from mosmedai.pipeline.work import check_series_limit, plan

log = logging.getLogger("mosmedai.ingress.dicomweb")

router = APIRouter(prefix=PREFIX, tags=["DICOMweb"])


CANNOT_UNDERSTAND = 0xC000
DOES_NOT_MATCH_SOP_CLASS = 0xA900
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_NOT_SUPPORTED = 0x0122

#: InputError codes of dicom_input.decode and the job store -> Failure Reason (PS3.18 I.2.2).
FAILURE_REASONS = {
    "empty_body": CANNOT_UNDERSTAND,
    "not_dicom": CANNOT_UNDERSTAND,
    "unreadable_dicom": CANNOT_UNDERSTAND,
    "no_transfer_syntax": CANNOT_UNDERSTAND,
    "missing_attribute": CANNOT_UNDERSTAND,
    "corrupt_pixel_data": CANNOT_UNDERSTAND,
    "no_pixel_data": CANNOT_UNDERSTAND,
    "undecodable_transfer_syntax": TRANSFER_SYNTAX_NOT_SUPPORTED,
    "not_grayscale": SOP_CLASS_NOT_SUPPORTED,
    "unsupported_bit_depth": SOP_CLASS_NOT_SUPPORTED,
    "image_too_small": SOP_CLASS_NOT_SUPPORTED,
    "no_tool_accepts": SOP_CLASS_NOT_SUPPORTED,
    "image_too_large": OUT_OF_RESOURCES,
    "too_many_series": OUT_OF_RESOURCES,
    "storage_unavailable": OUT_OF_RESOURCES,
    "sop_class_mismatch": DOES_NOT_MATCH_SOP_CLASS,
    "study_mismatch": DOES_NOT_MATCH_SOP_CLASS,
    "not_application_dicom": CANNOT_UNDERSTAND,
}


def failure_reason(code: str) -> int:
    return FAILURE_REASONS.get(code, PROCESSING_FAILURE)


@dataclass
class Part:
    """One part of a STOW-RS request and what became of it."""

    body: bytes
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    image: DecodedImage | None = None
    failure: int | None = None
    reason: str = ""

    def fail(self, code: str, message: str) -> None:
        if self.failure is None:
            self.failure, self.reason = failure_reason(code), f"{code}: {message}"


def _identify(part: Part) -> None:
    """SOP Class / Instance and Study UIDs of a part that may not decode (for the response)."""
    try:
        dataset = pydicom.dcmread(io.BytesIO(part.body), force=True, stop_before_pixels=True,
                                  specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
        meta = getattr(dataset, "file_meta", None) or Dataset()
        part.sop_class_uid = str(dataset.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or "")
        part.sop_instance_uid = str(dataset.get("SOPInstanceUID", "")
                                    or meta.get("MediaStorageSOPInstanceUID", "") or "")
        part.study_instance_uid = str(dataset.get("StudyInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - nothing recoverable: the item references no UIDs
        pass


#: (0002,0000..) of an Explicit VR Little Endian file meta group: a Part-10 stream without
#: the preamble, as pydicom's dcmwrite (and so dicomweb-client) writes when the data set has none.
_META_GROUP = b"\x02\x00"


def with_preamble(body: bytes) -> bytes:
    """A Part-10 body sent without the 128-byte preamble and 'DICM' gets them (PS3.10 7.1)."""
    if body[:2] == _META_GROUP and body[128:132] != b"DICM":
        return b"\x00" * 128 + b"DICM" + body
    return body


def check_part(part: Part, study: str | None, max_pixels: int) -> None:
    """Decode one part and check it against its file meta and the target study (thread)."""
    part.body = with_preamble(part.body)
    _identify(part)
    if part.failure is not None:
        return
    try:
        image = decode(part.body, max_pixels)
    except InputError as error:
        part.fail(error.code, error.message)
        return
    header = image.header
    meta = getattr(header, "file_meta", None) or Dataset()
    sop_class = str(header.get("SOPClassUID", "") or "")
    if not sop_class:
        part.fail("missing_attribute", "SOP Class UID (0008,0016) is missing")
        return
    media_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
    media_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    if (media_class and media_class != sop_class) or (media_instance and media_instance != image.sop_instance_uid):
        part.fail("sop_class_mismatch", "the file meta's Media Storage SOP Class/Instance UID differs from the "
                  "data set's SOP Class/Instance UID")
        return
    if study is not None and image.study_instance_uid != study:
        part.fail("study_mismatch", f"Study Instance UID {image.study_instance_uid} is not the study "
                  f"{study} of the request URL")
        return
    part.image = image


def plan_studies(parts: list[Part], enabled: list[str], transport_max_side: int,
                 max_series: int) -> dict[str, list[Part]]:
    """The decoded parts that some enabled tool reads, by study; the others are failed (thread)."""
    seen: set[str] = set()
    studies: dict[str, list[Part]] = {}
    for part in parts:
        if part.image is None:
            continue
        if part.image.sop_instance_uid in seen:
            part.fail("duplicate_instance", f"SOP Instance UID {part.image.sop_instance_uid} is in the request "
                      "more than once")
            continue
        seen.add(part.image.sop_instance_uid)
        studies.setdefault(part.image.study_instance_uid, []).append(part)
    planned: dict[str, list[Part]] = {}
    for study, members in studies.items():
        try:
            check_series_limit([part.image for part in members], max_series)
        except InputError as error:
            for part in members:
                part.fail(error.code, error.message)
            continue
        by_series: dict[str, list[Part]] = {}
        for part in members:
            by_series.setdefault(part.image.series_instance_uid, []).append(part)
        for series_parts in by_series.values():
            try:
                items, _ = plan([part.image for part in series_parts], enabled, None, transport_max_side)
            except InputError as error:
                items = None
                for part in series_parts:
                    part.fail(error.code, error.message)
            if items is None:
                continue
            if not items:
                for part in series_parts:
                    part.fail("no_tool_accepts", "no enabled tool reads this series "
                              f"({part.image.facts.looked_at})")
                continue
            planned.setdefault(study, []).extend(series_parts)
    return planned


def store_response(parts: list[Part], study_url: str | None, instance_url=None) -> tuple[int, Dataset]:
    """The Store Instances Response Module (PS3.18 Annex I) and the status (PS3.18 10.5.3)."""
    response = Dataset()
    response.SpecificCharacterSet = "ISO_IR 192"
    response.RetrieveURL = study_url or ""
    stored, failed = [], []
    for part in parts:
        item = Dataset()
        item.ReferencedSOPClassUID = part.sop_class_uid
        item.ReferencedSOPInstanceUID = part.sop_instance_uid
        if part.failure is None:
            # Type 2: the stored originals are not retrievable here (only their results are).
            item.RetrieveURL = instance_url(part) if instance_url else ""
            stored.append(item)
        else:
            item.FailureReason = part.failure
            failed.append(item)
    if failed:
        response.FailedSOPSequence = failed
    if stored:
        response.ReferencedSOPSequence = stored
    status = 200 if not failed else 202 if stored else 409
    return status, response


async def _store(request: Request, study: str | None) -> Response:
    service, tenant = studies_of(request), tenant_of(request)
    settings = service.settings
    form = dataset_format(request.headers.get("accept"), multipart_xml=False)
    if study is not None and (len(study) > 64 or not UID.match(study)):
        raise InputError(400, "bad_study_uid", f"{study!r} is not a Study Instance UID")
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    root = dict(parse_accept(content_type)[0].params) if media_type else {}
    if media_type != MULTIPART_RELATED or root.get("type", DICOM_MEDIA_TYPE).lower() != DICOM_MEDIA_TYPE:
        raise InputError(415, "unsupported_media_type",
                         f"Content-Type is '{content_type or '(none)'}'; STOW-RS here takes "
                         f'{MULTIPART_RELATED}; type="{DICOM_MEDIA_TYPE}" (DICOM Part-10 instances)')
    body = await read_body(request, settings.max_body_bytes)
    pieces = multipart_parts(body, content_type)
    if len(pieces) > settings.max_instances_per_request:
        raise InputError(413, "too_many_instances", f"{len(pieces)} instances in one request; the limit is "
                         f"{settings.max_instances_per_request} (max_instances_per_request)")
    parts = []
    for part_type, payload in pieces:
        part = Part(payload)
        if part_type != DICOM_MEDIA_TYPE:
            part.fail("not_application_dicom", f"the part is {part_type or '(untyped)'}, not {DICOM_MEDIA_TYPE}")
        parts.append(part)

    enabled = service.enabled(tenant)

    def decode_and_plan() -> dict[str, list[Part]]:
        for part in parts:
            check_part(part, study, settings.max_pixels)
        return plan_studies(parts, enabled, settings.transport_max_side,
                            settings.max_series_per_request)

    planned = await asyncio.to_thread(decode_and_plan)
    for study_uid, members in planned.items():
        try:
            await service.accept_decoded(tenant, [part.body for part in members], [part.image for part in members],
                                         origin_of(request, "dicomweb"))
        except InputError as error:
            for part in members:
                part.fail(error.code, error.message)
    for part in parts:
        if part.failure is not None:
            log.info("STOW-RS of %s: instance %s not stored (0x%04X) %s", tenant.id,
                     part.sop_instance_uid or "?", part.failure, part.reason)
        part.image = None  # the pixels are not needed any more
    stored_studies = sorted({part.study_instance_uid for part in parts if part.failure is None})
    target = study or (stored_studies[0] if len(stored_studies) == 1 else None)
    base = base_url(request)
    status, response = store_response(parts, f"{base}/studies/{target}" if target else None)
    return dataset_response(response, form, status)


_STOW_DOC = dict(
    summary="STOW-RS: store instances (multipart/related; type=\"application/dicom\")",
    description="PS3.18 10.5. Each stored study becomes one accepted job: every enabled tool that reads it "
    "runs, and its SR and secondary captures become searchable (QIDO-RS) and retrievable (WADO-RS) under "
    "/dicomweb. Answer: the Store Instances Response Module as application/dicom+json (default) or "
    "application/dicom+xml; 200 all stored, 202 some, 409 none.",
    response_class=Response,
    openapi_extra={"requestBody": {"required": True, "content": {
        MULTIPART_RELATED: {"schema": {"type": "string", "format": "binary"}}}}},
)


@router.post("/studies", **_STOW_DOC)
async def stow(request: Request) -> Response:
    return await _store(request, None)


@router.post("/studies/{study}", **_STOW_DOC)
async def stow_study(study: str, request: Request) -> Response:
    return await _store(request, study)


