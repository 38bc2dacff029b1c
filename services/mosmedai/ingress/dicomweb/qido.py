"""QIDO-RS (PS3.18 10.6): ``GET /dicomweb/studies``, ``/series``, ``/instances`` and the study and
series scoped forms search the tenant's RESULT objects only: the SR and secondary captures of its
done jobs. The submitted originals are never searchable here. No match: 204 (PS3.18 Table
10.6.3-1)."""

from __future__ import annotations

import asyncio
import fnmatch
import re
from dataclasses import dataclass

import pydicom
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from mosmedai.ingress.auth import studies_of, tenant_of
from mosmedai.ingress.dicomweb.media import (
    PREFIX,
    base_url,
    dataset_format,
    datasets_response,
)
from mosmedai.pipeline.errors import InputError
from mosmedai.results.result_index import ResultInstance

router = APIRouter(prefix=PREFIX, tags=["DICOMweb"])


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


async def instances_of(request: Request, study: str | None = None) -> tuple[list[ResultInstance], str]:
    """The tenant's result instances (of one study, or all), and the service's base URL."""
    service, tenant = studies_of(request), tenant_of(request)
    return await asyncio.to_thread(service.index.instances, tenant.id, study), base_url(request)


async def _search(request: Request, level: str, study: str | None = None, series: str | None = None) -> Response:
    tenant_of(request)
    form = dataset_format(request.headers.get("accept"), multipart_xml=True)
    query = parse_query(list(request.query_params.multi_items()))
    if study is None and "StudyInstanceUID" in query.matches:
        uids = [uid for uid in re.split(r"[,\\]", query.matches["StudyInstanceUID"]) if uid.strip()]
        if len(uids) == 1:
            study = uids[0].strip()  # the study index instead of every job of the tenant
    instances, base = await instances_of(request, study)
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


