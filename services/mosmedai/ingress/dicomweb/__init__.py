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

from fastapi import APIRouter

from mosmedai.ingress.dicomweb import qido, stow, wado
from mosmedai.ingress.dicomweb.media import (
    DICOM_JSON,
    DICOM_XML,
    NATIVE_DICOM_NS,
    check_dicom_accept,
    dataset_format,
    to_xml,
)
from mosmedai.ingress.dicomweb.qido import match_value, parse_query, search
from mosmedai.ingress.dicomweb.stow import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH_SOP_CLASS,
    Part,
    check_part,
    failure_reason,
    store_response,
)
from mosmedai.results.result_index import ResultInstance

#: STOW-RS, QIDO-RS and WADO-RS, in that order (the first route that matches answers).
router = APIRouter()
for part in (stow, qido, wado):
    router.include_router(part.router)

__all__ = ["CANNOT_UNDERSTAND", "DICOM_JSON", "DICOM_XML", "DOES_NOT_MATCH_SOP_CLASS", "NATIVE_DICOM_NS", "Part",
           "ResultInstance", "check_dicom_accept", "check_part", "dataset_format", "failure_reason", "match_value",
           "parse_query", "router", "search", "store_response", "to_xml"]
