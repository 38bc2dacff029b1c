"""DICOMweb media: Accept negotiation (PS3.18 8.7), the DICOM JSON and XML (PS3.19 Native DICOM
Model) renderings of data sets, and the service's base URL."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from mosmedai.pipeline.errors import InputError
from mosmedai.pipeline.multipart import (
    DICOM_MEDIA_TYPE,
    MULTIPART_RELATED,
    multipart_body,
)

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
NATIVE_DICOM_NS = "http://dicom.nema.org/PS3.19/models/NativeDICOM"

PREFIX = "/dicomweb"


def base_url(request: Request) -> str:
    return f"{str(request.base_url).rstrip('/')}{PREFIX}"


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


