"""DICOMweb (PS3.18) under ``/dicomweb``: STOW-RS in, QIDO-RS and WADO-RS over the results.

- STOW-RS ``POST /dicomweb/studies[/{study}]`` (PS3.18 10.5): ``multipart/related;
  type="application/dicom"``. Every part is decoded; a part that cannot be stored is named in
  the Failed SOP Sequence with a Failure Reason (PS3.18 I.2.2) and the rest go on. The stored
  instances of each study become one accepted job (as ``POST /v1/studies`` with
  ``Prefer: respond-async``). 200: all stored, 202: some, 409: none. The Store Instances
  Response Module is DICOM JSON (default) or DICOM XML (PS3.19 Native DICOM Model) by Accept.
- QIDO-RS ``GET /dicomweb/studies``, ``/series``, ``/instances`` (and the study/series scoped
  forms; PS3.18 10.6) search the tenant's RESULT objects only: the SR and secondary captures
  of its done jobs. The submitted originals are never searchable or retrievable here.
  No match: 204 (PS3.18 Table 10.6.3-1).
- WADO-RS ``GET /dicomweb/studies/{study}[/series/{series}[/instances/{sop}]]`` (PS3.18
  10.4): ``multipart/related; type="application/dicom"`` of the Part-10 result objects, as
  stored (Explicit VR Little Endian); ``.../metadata``: DICOM JSON without Pixel Data.
  A study, series or instance the tenant has no result of is 404, whether or not another
  tenant has one (no enumeration).

The index of a tenant's results is derived from the job store (the done jobs and their
result object keys) and the objects' headers; result objects never change, so parsed
headers are kept in an LRU keyed by object key, and a done job's object keys likewise.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import fnmatch
import io
import json
import logging
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass, field

import pydicom
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from mosmedai.ingress.http_body import read_body
from mosmedai.jobs.store import DONE, UID
from mosmedai.pipeline.dicom_input import DecodedImage, decode
from mosmedai.pipeline.errors import InputError
from mosmedai.pipeline.multipart import (
    DICOM_MEDIA_TYPE,
    MULTIPART_RELATED,
    multipart_body,
    multipart_parts,
)
from mosmedai.pipeline.work import check_series_limit, plan

log = logging.getLogger("mosmedai.ingress.dicomweb")

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
NATIVE_DICOM_NS = "http://dicom.nema.org/PS3.19/models/NativeDICOM"

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])


# --- backend (set by the gateway replica) ---------------------------------------------------------
@dataclass
class Backend:
    jobs: object  # JobStore
    runner: object  # JobRunner
    settings: object  # Settings
    tools_of: object = None  # tenant -> the tools it gets (mosmedai.catalog.tool_config); None: every served tool
    index: "ResultIndex" = field(init=False)

    def __post_init__(self):
        self.index = ResultIndex(self.jobs)


_backend: Backend | None = None


def install(jobs, runner, settings, tools_of=None) -> None:
    """Called by Gateway.__init__: the job store, runner and settings of this replica, and
    ``tools_of(tenant)``, the tools a tenant gets."""
    global _backend
    _backend = Backend(jobs, runner, settings, tools_of)


def _require() -> Backend:
    if _backend is None:
        raise InputError(503, "not_ready", "the DICOMweb service is starting")
    return _backend


def _tenant(request: Request):
    """The tenant the gateway's auth middleware put in the scope (it answers 401 itself)."""
    return request.scope["mosmedai.tenant"]


# --- media types -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaRange:
    type: str
    params: dict
    q: float


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first (q = 0 dropped); [] when absent."""
    ranges = []
    for position, text in enumerate(_split_outside_quotes(header or "", ",")):
        pieces = _split_outside_quotes(text, ";")
        media = pieces[0].strip().lower() if pieces else ""
        if not media:
            continue
        params, q = {}, 1.0
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"')
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
            elif name:
                params[name] = value
        if q > 0:
            ranges.append((-q, position, MediaRange(media, params, q)))
    return [media for _, _, media in sorted(ranges, key=lambda entry: entry[:2])]


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    out, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(char)
    out.append("".join(current))
    return out


def _not_acceptable(accept: str | None, offered: str) -> InputError:
    return InputError(406, "not_acceptable", f"Accept '{accept}' names nothing this resource is offered as; "
                      f"offered: {offered}")


def dataset_format(accept: str | None, *, multipart_xml: bool) -> str:
    """"json" or "xml" for a DICOM data set response (Store Instances Response: XML is
    application/dicom+xml; search and metadata: multipart/related; type="application/dicom+xml")."""
    ranges = parse_accept(accept)
    if not ranges:
        return "json"
    for media in ranges:
        if media.type in (DICOM_JSON, "application/json", "*/*", "application/*"):
            return "json"
        if media.type in (DICOM_XML, "application/xml") and not multipart_xml:
            return "xml"
        if media.type in (MULTIPART_RELATED, "multipart/*") and media.params.get("type", "").lower() == DICOM_XML:
            return "xml"
    xml = f'multipart/related; type="{DICOM_XML}"' if multipart_xml else DICOM_XML
    raise _not_acceptable(accept, f"{DICOM_JSON}, {xml}")


def check_dicom_accept(accept: str | None) -> None:
    """WADO-RS instances: multipart/related; type="application/dicom" in the stored transfer
    syntax (Explicit VR Little Endian, the default of PS3.18 8.7.3.5); nothing is transcoded."""
    ranges = parse_accept(accept)
    if not ranges:
        return
    for media in ranges:
        if media.type in ("*/*", "multipart/*"):
            return
        if media.type == MULTIPART_RELATED:
            part_type = media.params.get("type", DICOM_MEDIA_TYPE).lower()
            syntax = media.params.get("transfer-syntax", "*")
            if part_type in (DICOM_MEDIA_TYPE, "application/*", "*/*") and syntax in ("*", ExplicitVRLittleEndian):
                return
    raise _not_acceptable(accept, f'multipart/related; type="{DICOM_MEDIA_TYPE}"; '
                          f"transfer-syntax={ExplicitVRLittleEndian}")


# --- DICOM XML (PS3.19 Annex A, Native DICOM Model) -------------------------------------------------
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")


def _xml_attributes(parent: ET.Element, dataset: Dataset) -> None:
    for element in dataset:
        attributes = {"tag": f"{element.tag:08X}", "vr": element.VR}
        if element.keyword:
            attributes["keyword"] = element.keyword
        if element.tag.is_private and getattr(element, "private_creator", None):
            attributes["privateCreator"] = element.private_creator
        node = ET.SubElement(parent, "DicomAttribute", attributes)
        value = element.value
        if element.VR == "SQ":
            for number, item in enumerate(value or (), start=1):
                _xml_attributes(ET.SubElement(node, "Item", number=str(number)), item)
            continue
        if value is None or value == "" or value == b"":
            continue
        if element.VR in _BINARY_VRS:
            data = value if isinstance(value, (bytes, bytearray)) else b"".join(value)
            ET.SubElement(node, "InlineBinary").text = base64.b64encode(data).decode("ascii")
            continue
        values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
        for number, item in enumerate(values, start=1):
            if element.VR == "PN":
                _xml_person_name(node, number, item)
            elif element.VR == "AT":
                ET.SubElement(node, "Value", number=str(number)).text = f"{int(item):08X}"
            else:
                child = ET.SubElement(node, "Value", number=str(number))
                if item is not None and item != "":
                    child.text = str(item)


def _xml_person_name(node: ET.Element, number: int, name) -> None:
    person = ET.SubElement(node, "PersonName", number=str(number))
    groups = str(name).split("=")
    for group_name, group in zip(_PN_GROUPS, groups):
        if not group:
            continue
        group_node = ET.SubElement(person, group_name)
        for component_name, component in zip(_PN_COMPONENTS, group.split("^")):
            if component:
                ET.SubElement(group_node, component_name).text = component


def to_xml(dataset: Dataset) -> bytes:
    """The data set in the Native DICOM Model (PS3.19 A.1), UTF-8 with an XML declaration."""
    root = ET.Element("NativeDicomModel", xmlns=NATIVE_DICOM_NS)
    _xml_attributes(root, dataset)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def dataset_response(dataset: Dataset, form: str, status: int = 200) -> Response:
    if form == "xml":
        return Response(to_xml(dataset), status_code=status, media_type=DICOM_XML)
    return Response(json.dumps(dataset.to_json_dict()), status_code=status, media_type=DICOM_JSON)


def datasets_response(datasets: list[Dataset], form: str) -> Response:
    """Search results or metadata: a JSON array, or multipart/related of XML data sets."""
    if not datasets:
        return Response(status_code=204)
    if form == "xml":
        body, content_type = multipart_body([to_xml(dataset) for dataset in datasets], DICOM_XML)
        return Response(body, media_type=content_type)
    return Response(json.dumps([dataset.to_json_dict() for dataset in datasets]), media_type=DICOM_JSON)


# --- STOW-RS ---------------------------------------------------------------------------------------
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


def _base(request: Request) -> str:
    return f"{str(request.base_url).rstrip('/')}{router.prefix}"


async def _store(request: Request, study: str | None) -> Response:
    from mosmedai.studies.runner import accept

    backend = _require()
    tenant = _tenant(request)
    settings = backend.settings
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

    enabled = list(backend.tools_of(tenant)) if backend.tools_of else list(settings.enabled_tools)

    def decode_and_plan() -> dict[str, list[Part]]:
        for part in parts:
            check_part(part, study, settings.max_pixels)
        return plan_studies(parts, enabled, settings.transport_max_side,
                            settings.max_series_per_request)

    planned = await asyncio.to_thread(decode_and_plan)
    for study_uid, members in planned.items():
        try:
            await accept(backend.jobs, backend.runner, tenant.id, [part.body for part in members],
                         [part.image for part in members], None, source="dicomweb")
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
    base = _base(request)
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


# --- the index of a tenant's result objects -------------------------------------------------------
@dataclass(frozen=True)
class ResultInstance:
    job_id: str
    created_at: float
    name: str
    key: str
    header: Dataset  # without Pixel Data

    @property
    def study(self) -> str:
        return str(self.header.get("StudyInstanceUID", ""))

    @property
    def series(self) -> str:
        return str(self.header.get("SeriesInstanceUID", ""))

    @property
    def sop(self) -> str:
        return str(self.header.get("SOPInstanceUID", ""))


class _LRU:
    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


class ResultIndex:
    """A tenant's result instances, from the job store; immutable things are cached."""

    def __init__(self, jobs, max_headers: int = 4096, max_jobs: int = 20000, threads: int = 8):
        self.jobs = jobs
        self.headers = _LRU(max_headers)  # object key -> header Dataset
        self.done = _LRU(max_jobs)  # (tenant, job id) -> (created_at, ((name, key), ...))
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="dicomweb-index")

    def _job_ids(self, tenant: str, study: str | None) -> list[str]:
        store, bucket = self.jobs.store, self.jobs.incoming
        if study is not None:
            return [key.rsplit("/", 1)[1] for key in store.list(bucket, f"study/{tenant}/{study}/")]
        return [key.rsplit("/", 1)[1][:-5] for key in store.list(bucket, f"jobs/{tenant}/") if key.endswith(".json")]

    def _done_objects(self, tenant: str, job_id: str):
        cached = self.done.get((tenant, job_id))
        if cached is not None:
            return cached
        job = self.jobs.get(tenant, job_id)
        if job is None or job.state != DONE:
            return None
        objects = tuple(sorted(self.jobs.object_keys(job).items()))
        entry = (job.created_at, objects)
        self.done.put((tenant, job_id), entry)
        return entry

    def header(self, key: str) -> Dataset:
        header = self.headers.get(key)
        if header is None:
            header = pydicom.dcmread(io.BytesIO(self.jobs.read(key)), stop_before_pixels=True)
            self.headers.put(key, header)
        return header

    def instances(self, tenant: str, study: str | None = None) -> list[ResultInstance]:
        """The tenant's result instances (of one study), oldest job first (blocking)."""
        if study is not None and (len(study) > 64 or not UID.match(study)):
            return []
        ids = self._job_ids(tenant, study)
        done = self.pool.map(lambda job_id: self._done_objects(tenant, job_id), ids)
        entries = [(job_id, entry) for job_id, entry in zip(ids, done) if entry is not None]
        entries.sort(key=lambda pair: (pair[1][0], pair[0]))
        wanted = [(job_id, created, name, key) for job_id, (created, objects) in entries
                  for name, key in objects if name.endswith(".dcm")]
        headers = list(self.pool.map(lambda row: self.header(row[3]), wanted))
        found = [ResultInstance(job_id, created, name, key, header)
                 for (job_id, created, name, key), header in zip(wanted, headers)]
        if study is not None:
            found = [instance for instance in found if instance.study == study]
        return found

    def read(self, key: str) -> bytes:
        return self.jobs.read(key)


# --- QIDO-RS ------------------------------------------------------------------------------------
STUDY_LEVEL = ("SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
               "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
               "StudyDescription")
SERIES_LEVEL = ("SpecificCharacterSet", "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
                "StudyInstanceUID")
INSTANCE_LEVEL = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
                  "BitsAllocated", "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                  "SeriesNumber")
#: Query parameters that are not attribute matches (PS3.18 8.3.4).
CONTROL_KEYS = frozenset({"limit", "offset", "includefield", "fuzzymatching", "emptyvaluematching",
                          "multiplematches"})
#: Return attributes computed from the index (not matchable except ModalitiesInStudy).
COMPUTED = frozenset({"ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                      "NumberOfSeriesRelatedInstances", "RetrieveURL"})


def resolve_keyword(name: str) -> str:
    """An attribute keyword from a keyword or an 8-hex-digit tag; InputError 400 otherwise."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
    elif tag_for_keyword(name) is not None:
        return name
    raise InputError(400, "unknown_attribute", f"query key {name!r} is neither a DICOM keyword nor a tag "
                     "this service knows (nested sequence paths are not supported)")


@dataclass
class Query:
    matches: dict[str, str]
    include: set[str]
    include_all: bool
    limit: int | None
    offset: int


def parse_query(params: list[tuple[str, str]]) -> Query:
    matches: dict[str, str] = {}
    include: set[str] = set()
    include_all, limit, offset = False, None, 0
    for name, value in params:
        lowered = name.lower()
        if lowered in ("limit", "offset"):
            if not value.isdigit():
                raise InputError(400, "bad_query", f"{lowered} must be a non-negative integer, not {value!r}")
            if lowered == "limit":
                limit = int(value)
            else:
                offset = int(value)
        elif lowered == "includefield":
            for field_name in value.split(","):
                field_name = field_name.strip()
                if field_name.lower() == "all":
                    include_all = True
                elif field_name:
                    include.add(resolve_keyword(field_name))
        elif lowered in CONTROL_KEYS:
            continue
        else:
            matches[resolve_keyword(name)] = value
    return Query(matches, include, include_all, limit, offset)


def _values(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(item) for item in value]
    return [str(value)]


def match_value(keyword: str, pattern: str, actual) -> bool:
    """PS3.4 C.2.2.2 matching of one attribute: universal (empty), UID list, range (DA/TM/DT),
    wildcard (* ?), single value; a multi-valued attribute matches when any value does."""
    if pattern == "":
        return True
    try:
        vr = dictionary_VR(keyword)
    except KeyError:
        vr = ""
    values = _values(actual)
    if vr == "UI":
        wanted = {uid.strip() for uid in re.split(r"[,\\]", pattern) if uid.strip()}
        return any(value in wanted for value in values)
    if vr in ("DA", "TM", "DT") and "-" in pattern:
        low, _, high = pattern.partition("-")
        return any(value and (not low or value >= low) and (not high or value[:len(high)] <= high)
                   for value in values)
    if vr in ("DA", "TM", "DT"):
        return any(value == pattern or (vr != "DA" and value.startswith(pattern)) for value in values)
    alternatives = [p for p in pattern.split("\\")] if vr != "PN" else [pattern]
    for alternative in alternatives:
        if "*" in alternative or "?" in alternative:
            regex = re.compile(fnmatch.translate(alternative), re.IGNORECASE if vr == "PN" else 0)
            if any(regex.match(value) for value in values):
                return True
        elif vr == "PN":
            if any(value.upper() == alternative.upper() for value in values):
                return True
        elif alternative in values:
            return True
    return False


def _copy(target: Dataset, source: Dataset, keywords) -> None:
    for keyword in keywords:
        if keyword in source and keyword not in target:
            target[keyword] = source[keyword]


def _empty(target: Dataset, keywords) -> None:
    """Requested return keys the objects do not have are returned empty (zero length)."""
    for keyword in keywords:
        if keyword not in target and keyword not in COMPUTED:
            vr = dictionary_VR(keyword)
            target[keyword] = pydicom.DataElement(tag_for_keyword(keyword), vr, [] if vr == "SQ" else None)


def search(level: str, instances: list[ResultInstance], query: Query, base: str) -> list[Dataset]:
    """QIDO-RS results at level "study", "series" or "instance" over these result instances."""
    groups: dict[tuple, list[ResultInstance]] = {}
    for instance in instances:
        key = {"study": (instance.study,), "series": (instance.study, instance.series),
               "instance": (instance.study, instance.series, instance.sop)}[level]
        groups.setdefault(key, []).append(instance)
    by_study: dict[str, list[ResultInstance]] = {}
    for instance in instances:
        by_study.setdefault(instance.study, []).append(instance)
    results = []
    for key, members in groups.items():
        first = members[0].header
        study_members = by_study[key[0]]
        modalities = sorted({str(m.header.get("Modality", "")) for m in study_members} - {""})
        ok = True
        for keyword, pattern in query.matches.items():
            if keyword == "ModalitiesInStudy":
                ok = any(match_value("Modality", pattern, modality) for modality in modalities) or pattern == ""
            elif keyword in COMPUTED:
                ok = True  # not matchable; returned
            else:
                ok = match_value(keyword, pattern, first.get(keyword))
            if not ok:
                break
        if not ok:
            continue
        dataset = Dataset()
        if level == "study":
            _copy(dataset, first, STUDY_LEVEL)
            dataset.ModalitiesInStudy = modalities
            dataset.NumberOfStudyRelatedSeries = len({m.series for m in members})
            dataset.NumberOfStudyRelatedInstances = len(members)
            dataset.RetrieveURL = f"{base}/studies/{key[0]}"
        elif level == "series":
            _copy(dataset, first, SERIES_LEVEL)
            dataset.NumberOfSeriesRelatedInstances = len(members)
            dataset.RetrieveURL = f"{base}/studies/{key[0]}/series/{key[1]}"
        else:
            _copy(dataset, first, INSTANCE_LEVEL)
            dataset.RetrieveURL = f"{base}/studies/{key[0]}/series/{key[1]}/instances/{key[2]}"
        wanted = set(query.matches) | query.include
        if query.include_all:
            wanted |= {element.keyword for element in first if element.keyword and element.VR != "SQ"}
        wanted -= {"ModalitiesInStudy"}
        _copy(dataset, first, sorted(wanted))
        _empty(dataset, sorted(wanted))
        results.append(dataset)
    end = None if query.limit is None else query.offset + query.limit
    return results[query.offset:end]


async def _instances(request: Request, study: str | None = None) -> tuple[list[ResultInstance], str]:
    backend = _require()
    tenant = _tenant(request)
    return await asyncio.to_thread(backend.index.instances, tenant.id, study), _base(request)


async def _search(request: Request, level: str, study: str | None = None, series: str | None = None) -> Response:
    _tenant(request)
    form = dataset_format(request.headers.get("accept"), multipart_xml=True)
    query = parse_query(list(request.query_params.multi_items()))
    if study is None and "StudyInstanceUID" in query.matches:
        uids = [uid for uid in re.split(r"[,\\]", query.matches["StudyInstanceUID"]) if uid.strip()]
        if len(uids) == 1:
            study = uids[0].strip()  # the study index instead of every job of the tenant
    instances, base = await _instances(request, study)
    if series is not None:
        instances = [instance for instance in instances if instance.series == series]
    return datasets_response(search(level, instances, query, base), form)


_QIDO = dict(response_class=Response, responses={204: {"description": "no match"}})


@router.get("/studies", summary="QIDO-RS: search the tenant's result studies", **_QIDO)
async def search_studies(request: Request) -> Response:
    return await _search(request, "study")


@router.get("/series", summary="QIDO-RS: search the tenant's result series", **_QIDO)
async def search_all_series(request: Request) -> Response:
    return await _search(request, "series")


@router.get("/instances", summary="QIDO-RS: search the tenant's result instances", **_QIDO)
async def search_all_instances(request: Request) -> Response:
    return await _search(request, "instance")


@router.get("/studies/{study}/series", summary="QIDO-RS: search the result series of a study", **_QIDO)
async def search_series(study: str, request: Request) -> Response:
    return await _search(request, "series", study)


@router.get("/studies/{study}/instances", summary="QIDO-RS: search the result instances of a study", **_QIDO)
async def search_study_instances(study: str, request: Request) -> Response:
    return await _search(request, "instance", study)


@router.get("/studies/{study}/series/{series}/instances",
            summary="QIDO-RS: search the result instances of a series", **_QIDO)
async def search_series_instances(study: str, series: str, request: Request) -> Response:
    return await _search(request, "instance", study, series)


# --- WADO-RS -----------------------------------------------------------------------------------
async def _selected(request: Request, study: str, series: str | None, sop: str | None) -> list[ResultInstance]:
    instances, _ = await _instances(request, study)
    if series is not None:
        instances = [instance for instance in instances if instance.series == series]
    if sop is not None:
        instances = [instance for instance in instances if instance.sop == sop]
    if not instances:
        what = f"study {study}" + (f", series {series}" if series else "") + (f", instance {sop}" if sop else "")
        raise InputError(404, "not_found", f"no result objects of {what} for this tenant")
    return instances


async def _retrieve(request: Request, study: str, series: str | None = None, sop: str | None = None) -> Response:
    _tenant(request)
    check_dicom_accept(request.headers.get("accept"))
    instances = await _selected(request, study, series, sop)
    index = _require().index
    payloads = await asyncio.gather(*(asyncio.to_thread(index.read, instance.key) for instance in instances))
    body, content_type = multipart_body(list(payloads))
    return Response(body, media_type=content_type)


async def _metadata(request: Request, study: str, series: str | None = None, sop: str | None = None) -> Response:
    _tenant(request)
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
