"""DICOM result objects: a TID 1500 Structured Report and annotated Secondary Captures.

The JSON results of one item (:class:`~mosmedai.results.schemas.ItemResult`: one image or one
volume series) become objects a PACS files with the study:

- :func:`build_sr` - a Comprehensive 3D SR with a TID 1500 Measurement Report (highdicom):
  device observer (the platform), procedure reported, an image library of the sources, per
  tool measurement groups (TID 1410 with the finding's box as an image region, or TID 1501)
  with the finding code, presence, probability, UCUM measurements, categories as
  qualitative evaluations, the algorithm (TID 4019: tool name and model version), and the
  disclaimer as a TEXT item in the report's Qualitative Evaluations container.
- :func:`build_secondary_captures` - RGB SC images of the source in display, the finding
  boxes drawn in, a banner with the disclaimer, tool titles, probabilities, measurements
  and image-quality warnings, for viewers that show no SR.
- :func:`image_quality_warnings` - simple defect checks preprocessing can do.
- :func:`result_objects` - all of them as Part-10 bytes named for the job store.

Coordinates: a :class:`~mosmedai.results.schemas.Location` is in source pixels with (0, 0) the
top-left pixel; SR SCOORD data are (column, row) pairs with 0\\0 the top-left corner of
the image (PS3.3 C.18.6.1.2), so a box row0..row1 x col0..col1 is written as is.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mosmedai.catalog.families import IMAGE
from mosmedai.catalog.imaging import (
    SIGNED_SHIFT,
    GrayscaleParams,
    VoiFunction,
    to_display,
)
from mosmedai.catalog.tools import CATALOG
from mosmedai.pipeline.dicom_input import grayscale_params
from mosmedai.results.schemas import (
    Finding,
    ItemResult,
    Location,
    MeasurementValue,
    ToolResult,
)

DISCLAIMER = "AI result, not a diagnosis"
MANUFACTURER = "mosmedai"
#: Private coding scheme of concepts without a fitting SNOMED CT / DCM code.
PRIVATE_SCHEME = "99MOSMEDAI"
#: Stable UID of the platform as a device observer (TID 1004), derived from its name.
DEVICE_UID = generate_uid(entropy_srcs=["mosmedai platform device observer"])
SR_SERIES_NUMBER = 9001
#: Sources listed in the SR's image library (TID 1600) at most; longer series are
#: referenced through the evidence sequences only.
IMAGE_LIBRARY_MAX = 64
SC_SERIES_NUMBER = 9002

# ---------------------------------------------------------------------------------------
# Codes

_SCT, _DCM = "SCT", "DCM"


def _code(value: str, scheme: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


#: Finding codes by tool name. Tools not listed are looked up by the words of their
#: finding (FINDING_KEYWORD_CODES), then fall back to a private code named after the tool.
TOOL_FINDING_CODES: dict[str, tuple[str, str, str]] = {
    "cxr_opacity": ("112001", _DCM, "Opacity"),  # CID 6102 thoracic radiographic findings
    "cxr_nodule": ("27925004", _SCT, "Nodule"),
    "cxr_pneumothorax": ("36118008", _SCT, "Pneumothorax"),
}

#: Finding codes by a word of the tool's finding text (first match, lower case).
FINDING_KEYWORD_CODES: tuple[tuple[str, tuple[str, str, str]], ...] = (
    ("pneumothorax", ("36118008", _SCT, "Pneumothorax")),
    ("ground glass", ("112120", _DCM, "Ground glass opacity")),
    ("ground-glass", ("112120", _DCM, "Ground glass opacity")),
    ("pleural effusion", ("60046008", _SCT, "Pleural effusion")),
    ("cardiomegaly", ("287272002", _SCT, "Cardiomegaly")),
    ("intracranial hemorrhage", ("1386000", _SCT, "Intracranial hemorrhage")),
    ("intracranial haemorrhage", ("1386000", _SCT, "Intracranial hemorrhage")),
    ("hemorrhage", ("50960005", _SCT, "Hemorrhage")),
    ("haemorrhage", ("50960005", _SCT, "Hemorrhage")),
    ("calcification", ("129748009", _SCT, "Radiographic calcification finding")),
    ("nodule", ("27925004", _SCT, "Nodule")),
    ("mass", ("4147007", _SCT, "Mass")),
    ("scoliosis", ("298382003", _SCT, "Scoliosis deformity of spine")),
    ("emphysema", ("87433001", _SCT, "Pulmonary emphysema")),
    ("osteoporosis", ("64859006", _SCT, "Osteoporosis")),
    ("opacity", ("112001", _DCM, "Opacity")),
)

#: Measurement (concept name) codes by measurement name; others get a private code.
MEASUREMENT_CODES: dict[str, tuple[str, str, str]] = {
    "cobb_angle": ("285285000", _SCT, "Cobb angle"),
}

#: Display meanings of UCUM units (the code value is the UCUM unit itself).
UCUM_MEANINGS = {
    "mm": "millimeter", "cm": "centimeter", "mm2": "square millimeter", "mm3": "cubic millimeter",
    "ml": "milliliter", "deg": "degree", "%": "percent", "[hnsf'U]": "Hounsfield unit",
    "1": "no units", "{slice}": "slice", "{category}": "category",
}

#: Procedure reported (CID 100 style) by family, then by modality.
FAMILY_PROCEDURES: dict[str, tuple[str, str, str]] = {
    "chest_xray": ("399208008", _SCT, "Plain chest X-ray"),
    "fluorography": ("399208008", _SCT, "Plain chest X-ray"),
    "mammography": ("71651007", _SCT, "Mammography"),
    "spine_xray": ("168537006", _SCT, "Plain radiography"),
    "ct_brain": ("303653007", _SCT, "Computed tomography of head"),
    "ct_chest": ("169069000", _SCT, "Computed tomography of chest"),
}
MODALITY_PROCEDURES: dict[str, tuple[str, str, str]] = {
    "CT": ("77477000", _SCT, "Computed tomography"),
    "MG": ("71651007", _SCT, "Mammography"),
    "DX": ("168537006", _SCT, "Plain radiography"),
    "CR": ("168537006", _SCT, "Plain radiography"),
    "DR": ("168537006", _SCT, "Plain radiography"),
}
IMAGING_PROCEDURE = ("363679005", _SCT, "Imaging procedure")

PRESENT = _code("52101004", _SCT, "Present")
ABSENT = _code("272519000", _SCT, "Absent")
PROBABILITY = _code("111012", _DCM, "Certainty of Finding")  # CID 6048 name, value 0..1
UNITLESS = _code("1", "UCUM", "no units")
COMMENT = _code("121106", _DCM, "Comment")
QUALITATIVE_EVALUATIONS = _code("126010", _DCM, "Qualitative Evaluations")


def _short(text: str, limit: int = 64) -> str:
    """Code Meaning is LO (64 characters)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _private_value(text: str) -> str:
    """Code Value is SH (16 characters): an upper-case slug, hashed when longer."""
    slug = re.sub(r"[^A-Z0-9]+", "-", text.upper()).strip("-") or "X"
    if len(slug) <= 16:
        return slug
    return slug[:9] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:6].upper()


def finding_code(tool: str, finding_text: str | None = None) -> hd.sr.CodedConcept:
    """The coded finding of a tool: the tool table, a keyword of the finding, or private."""
    if tool in TOOL_FINDING_CODES:
        return _code(*TOOL_FINDING_CODES[tool])
    spec = CATALOG.get(tool)
    text = (finding_text or (spec.finding if spec else "") or "").lower()
    for keyword, concept in FINDING_KEYWORD_CODES:
        if keyword in text:
            return _code(*concept)
    return _code(_private_value(tool), PRIVATE_SCHEME, _short(finding_text or (spec.finding if spec else tool)))


def measurement_code(tool: str, name: str) -> hd.sr.CodedConcept:
    if name in MEASUREMENT_CODES:
        return _code(*MEASUREMENT_CODES[name])
    spec = CATALOG.get(tool)
    description = next((m.description for m in (spec.measurements if spec else ()) if m.name == name), "")
    return _code(_private_value(name), PRIVATE_SCHEME, _short(description or name.replace("_", " ")))


def unit_code(unit: str) -> hd.sr.CodedConcept:
    return _code(unit, "UCUM", UCUM_MEANINGS.get(unit, unit))


def category_code(tool: str, measurement: MeasurementValue) -> hd.sr.CodedConcept:
    label = measurement.label
    if label is None and measurement.value is not None:
        spec = CATALOG.get(tool)
        labels = next((m.labels for m in (spec.measurements if spec else ()) if m.name == measurement.name), ())
        index = int(measurement.value)
        label = labels[index] if 0 <= index < len(labels) else None
    label = label if label is not None else str(measurement.value)
    return _code(_private_value(f"{measurement.name}-{label}"), PRIVATE_SCHEME, _short(label))


def procedure_code(item: ItemResult) -> hd.sr.CodedConcept:
    for result in item.tools:
        spec = CATALOG.get(result.tool)
        if spec is not None and spec.family.name in FAMILY_PROCEDURES:
            return _code(*FAMILY_PROCEDURES[spec.family.name])
    return _code(*MODALITY_PROCEDURES.get(item.modality.upper(), IMAGING_PROCEDURE))


# ---------------------------------------------------------------------------------------
# Source headers

#: Patient and study attributes every result object carries over from the source.
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                          "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID")
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "AccessionNumber", "ReferringPhysicianName", "StudyID")
#: Character set of every result object: UTF-8 (PS3.3 C.12.1.1.2) holds any text a source's
#: set can, so a result never inherits a source's unknown or wrong Specific Character Set.
RESULT_CHARACTER_SET = "ISO_IR 192"
#: Value representations whose bytes are decoded with the Specific Character Set (PS3.5 6.1.2.3).
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
#: Identifiers a result must keep even when a sender wrote them badly: without them it
#: would not belong to the study or reference its sources (the pipeline accepted them).
_KEPT_AS_IS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows",
                         "Columns", "FrameOfReferenceUID"})
#: Control characters no text value holds (TAB, LF, FF and CR are allowed in ST, LT and UT
#: only, and pydicom's VR checks reject them elsewhere; ESC is consumed by ISO 2022 decoding).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
#: Enumerated values checked beyond the VR (PS3.3 C.7.1.1, C.7.3.1, C.8.11.7, C.7.6.1.1.1).
_ENUMERATED = {"PatientSex": {"M", "F", "O"}, "Laterality": {"L", "R"}, "ImageLaterality": {"L", "R", "U", "B"}}
#: Spacings that are a ratio of mm per pixel: two positive numbers or nothing (a sender's
#: 0\\0 would make every length in a derived object zero or infinite).
_SPACINGS = frozenset({"PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"})
_ORIENTATION_LETTERS = re.compile(r"^[APRLHF]{1,3}$")
#: Character set of legacy Cyrillic text written without a declaration or under a wrong one
#: (the platform's senders are Russian hospitals): the last resort of _decode_text.
LEGACY_CYRILLIC = "cp1251"


def _declared_sets(dataset: pydicom.Dataset) -> list[str]:
    raw = dataset.get_item(0x00080005)
    if raw is None or raw.value is None:
        return []
    value = raw.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    values = value.split("\\") if isinstance(value, str) else list(value)
    return [str(term).strip() for term in values]


def _decode_text(raw: bytes, declared: list[str]) -> str:
    """The text of a source value in one declared character set (or none) whatever its
    sender declared: real senders declare ISO_IR 100 or nothing and write UTF-8 or
    Windows-1251 Cyrillic, or name a set that does not exist. In turn: ASCII; valid UTF-8
    (non-ASCII text that is valid UTF-8 is almost never an accident of another set); the
    declared set when the bytes hold no control characters in it; Windows-1251.
    (ISO 2022 code extensions, several sets declared, are decoded by pydicom: see _clean.)"""
    if raw.isascii():
        return raw.decode("ascii")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    codec = pydicom.charset.python_encoding.get(declared[0] if declared else "")
    if codec is not None and codec != "iso8859":  # iso8859 is pydicom's name for the ASCII default
        try:
            text = raw.decode(codec)
            if not _CONTROL.search(text):
                return text
        except UnicodeDecodeError:
            pass
    return raw.decode(LEGACY_CYRILLIC, "replace")


def _valid(keyword: str, vr: str, values: list) -> bool:
    """Whether every value is valid for its VR (pydicom's checks, real calendar dates) and
    for the attribute (enumerated values, positive spacings, orientation letters)."""
    from datetime import datetime

    from pydicom import config
    from pydicom.valuerep import validate_value

    for value in values:
        if value is None or value == "":
            continue
        text = str(getattr(value, "original_string", value))
        if isinstance(value, str) and _CONTROL.search(value):
            return False
        try:
            validate_value(vr, value if vr in _TEXT_VRS else text, config.RAISE)
            if vr == "DA":
                datetime.strptime(text.strip(), "%Y%m%d")
        except (ValueError, TypeError):
            return False
        if keyword in _ENUMERATED and text.strip().upper() not in _ENUMERATED[keyword]:
            return False
        if keyword == "PatientOrientation" and not _ORIENTATION_LETTERS.match(text.strip()):
            return False
    if keyword in _SPACINGS:
        try:
            numbers = [float(value) for value in values]
        except (TypeError, ValueError):
            return False
        return len(numbers) == 2 and all(math.isfinite(n) and n > 0 for n in numbers)
    if keyword == "PatientOrientation":
        return len(values) == 2
    return True


def _clean(dataset: pydicom.Dataset, declared: list[str]) -> pydicom.Dataset:
    """The standard (not private) attributes of a header whose values are valid, text
    decoded to Unicode with _decode_text; sequences cleaned item by item."""
    from pydicom.datadict import dictionary_VR, keyword_for_tag
    from pydicom.dataelem import DataElement
    from pydicom.multival import MultiValue
    from pydicom.valuerep import PersonName

    clean = pydicom.Dataset()
    for tag in list(dataset.keys()):
        if tag >= 0x7FE00000 or tag.is_private or tag.group in (0x0002, 0xFFFE):
            continue
        keyword = keyword_for_tag(tag)
        if not keyword or keyword == "SpecificCharacterSet":
            continue
        raw = dataset.get_item(tag)
        vr = str(getattr(raw, "VR", None) or dictionary_VR(tag))
        if keyword in _KEPT_AS_IS:
            clean[tag] = dataset[tag]
            continue
        try:
            if vr in _TEXT_VRS and isinstance(raw.value, bytes) and len(declared) <= 1:
                text = _decode_text(raw.value.rstrip(b" \x00"), declared)
                values = [text] if vr in ("ST", "LT", "UT") else text.split("\\")
                values = [PersonName(v) if vr == "PN" else v.strip() for v in values]
                element = DataElement(tag, vr, values if len(values) > 1 else values[0])
            else:
                element = dataset[tag]  # pydicom converts the raw value (may raise on garbage)
            if vr == "SQ":
                element = DataElement(tag, vr, [_clean(item, declared) for item in element.value])
            else:
                value = element.value
                values = list(value) if isinstance(value, (list, MultiValue)) else [value]
                if vr not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") and not _valid(keyword, vr, values):
                    continue
        except Exception:  # a value pydicom cannot even convert is invalid: leave it out
            continue
        clean[tag] = element
    return clean


def _header(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """What a result object may take from a source: its header without pixel data, private
    elements, or any value that is invalid for its VR or attribute (a zero Pixel Spacing, a
    Laterality of "left", a date of February 30th, text with control characters), text
    decoded to Unicode whatever character set the sender declared (the result is written in
    RESULT_CHARACTER_SET), and the type 2 patient/study attributes present (empty when the
    source lacks them or they were invalid: highdicom reads them as attributes)."""
    header = _clean(dataset, _declared_sets(dataset))
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _source_for(location: Location | None, sources: Sequence[pydicom.Dataset],
                item: ItemResult) -> pydicom.Dataset | None:
    """The source image a location is drawn on: its SOP Instance UID, else the slice index
    of the ordered series, else the single image of an image item."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    if location is not None and location.sop_instance_uid and location.sop_instance_uid in by_uid:
        return by_uid[location.sop_instance_uid]
    if location is not None and location.slice_index is not None:
        index = location.slice_index
        if 0 <= index < len(item.sop_instance_uids) and item.sop_instance_uids[index] in by_uid:
            return by_uid[item.sop_instance_uids[index]]
        if 0 <= index < len(sources):
            return sources[index]
    if item.kind != "volume" and len(sources) >= 1:
        if len(item.sop_instance_uids) == 1 and item.sop_instance_uids[0] in by_uid:
            return by_uid[item.sop_instance_uids[0]]
        return sources[0]
    return None


def _box(location: Location, dataset: pydicom.Dataset) -> tuple[float, float, float, float]:
    """(row0, col0, row1, col1) ordered and clipped to the image."""
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    row0, row1 = sorted((float(location.row0), float(location.row1)))
    col0, col1 = sorted((float(location.col0), float(location.col1)))
    return (min(max(row0, 0.0), rows), min(max(col0, 0.0), columns),
            min(max(row1, 0.0), rows), min(max(col1, 0.0), columns))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(float(value))


# ---------------------------------------------------------------------------------------
# Structured report


def _probability(result: ToolResult, finding: Finding | None) -> float | None:
    if finding is not None and _finite(finding.probability):
        return float(finding.probability)
    value = result.scores.get("probability")
    return float(value) if _finite(value) else None


def _measurements(result: ToolResult, algorithm: hd.sr.AlgorithmIdentification,
                  probability: float | None) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    numbers, evaluations = [], []
    if probability is not None:
        numbers.append(hd.sr.Measurement(name=PROBABILITY, value=probability, unit=UNITLESS,
                                         algorithm_id=algorithm))
    for measurement in result.measurements:
        if measurement.unit == "{category}" or measurement.label is not None:
            if measurement.value is None and measurement.label is None:
                continue
            evaluations.append(hd.sr.QualitativeEvaluation(
                name=measurement_code(result.tool, measurement.name),
                value=category_code(result.tool, measurement)))
        elif _finite(measurement.value):
            numbers.append(hd.sr.Measurement(
                name=measurement_code(result.tool, measurement.name), value=float(measurement.value),
                unit=unit_code(measurement.unit), algorithm_id=algorithm))
        # a value of null (not measurable) is left out: TID 300 needs a number
    return numbers, evaluations


def _tool_groups(result: ToolResult, sources: Sequence[pydicom.Dataset], item: ItemResult) -> list:
    """One measurement group per finding (the first carries the tool's measurements), or
    one group saying the finding is absent."""
    spec = CATALOG.get(result.tool)
    # TID 4019 Algorithm Parameters: where it ran (the pool) and how the study got there.
    parameters = [f"pool={result.pool}", f"route={result.route}"] if result.pool else None
    algorithm = hd.sr.AlgorithmIdentification(name=result.tool, version=result.model_version or "unknown",
                                              manufacturer=MANUFACTURER, parameters=parameters)
    findings: list[Finding | None] = list(result.findings) or [None]
    groups = []
    for number, finding in enumerate(findings, start=1):
        concept = finding_code(result.tool, finding.finding if finding else (spec.finding if spec else None))
        presence = PRESENT if finding is not None else ABSENT
        # the tool's measurements go with its first finding (or its only group)
        carrier = result if number == 1 else result.model_copy(update={"measurements": []})
        numbers, evaluations = _measurements(carrier, algorithm, _probability(result, finding))
        if spec is None or spec.has_probability or finding is not None:
            evaluations.insert(0, hd.sr.QualitativeEvaluation(name=concept, value=presence))
        tracking = hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=_short(f"{result.tool} #{number}"))
        common = dict(tracking_identifier=tracking, finding_type=concept, algorithm_id=algorithm,
                      measurements=numbers or None, qualitative_evaluations=evaluations or None)
        location = finding.location if finding is not None else None
        image = _source_for(location, sources, item) if location is not None else None
        if location is not None and image is not None:
            row0, col0, row1, col1 = _box(location, image)
            graphic = np.array([[col0, row0], [col1, row0], [col1, row1], [col0, row1], [col0, row0]],
                               dtype=np.float32)
            region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=graphic,
                                       source_image=hd.sr.SourceImageForRegion.from_source_image(image))
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common))
        else:
            referenced = [_source_for(None, sources, item)] if item.kind != "volume" else []
            source_images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
                             for ds in referenced if ds is not None]
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(source_images=source_images or None,
                                                                      **common))
    return groups


def _disclaimer_container() -> hd.sr.ContainerContentItem:
    """TID 1500 row 'Qualitative Evaluations' (126010) with the disclaimer as TEXT."""
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=COMMENT, value=DISCLAIMER,
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    return container


def _ordered_sources(sources: Sequence[pydicom.Dataset], item: ItemResult) -> list[pydicom.Dataset]:
    """The sources the item read, in the item's order (all sources when it names none)."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    chosen = [by_uid[uid] for uid in item.sop_instance_uids if uid in by_uid]
    return chosen or list(sources)


def build_sr(sources: list[pydicom.Dataset], item: ItemResult, *, tool_versions: dict[str, str] | None = None,
             series_number: int = SR_SERIES_NUMBER, institution: str | None = None) -> pydicom.Dataset:
    """A Comprehensive 3D SR (TID 1500 Measurement Report) of one item's results.

    ``sources`` are the item's images (headers suffice; pixel data are not read);
    ``tool_versions`` overrides the model version of a tool where the result has none.
    """
    if not sources:
        raise ValueError("an SR needs the source images it reports on")
    headers = [_header(ds) for ds in _ordered_sources(sources, item)]
    tool_versions = tool_versions or {}
    results = [r if r.model_version or r.tool not in tool_versions
               else r.model_copy(update={"model_version": tool_versions[r.tool]}) for r in item.tools]

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name="mosmedai AI platform", manufacturer_name=MANUFACTURER,
            model_name=_short(", ".join(f"{r.tool} {r.model_version or 'unknown'}" for r in results) or "mosmedai"),
            # TID 1004 Device Observer Physical Location: the pools that ran the tools, and the route
            physical_location=_short("; ".join(dict.fromkeys(f"pool {r.pool} ({r.route})" for r in results
                                                             if r.pool))) or None,
        ),
    )
    groups = [group for result in results for group in _tool_groups(result, headers, item)]
    if not groups:  # no tool answered: still a valid report saying so
        groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="no tool results"),
            qualitative_evaluations=None)]
    arguments = dict(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_code(item),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    try:
        # TID 1600 Image Library: needs geometry attributes some senders leave out, and
        # grows with the series; the evidence sequences reference every source anyway.
        if len(headers) > IMAGE_LIBRARY_MAX:
            raise ValueError("series too long for an image library")
        report = hd.sr.MeasurementReport(referenced_images=headers, **arguments)
    except (AttributeError, ValueError, TypeError):
        report = hd.sr.MeasurementReport(**arguments)
    report[0].ContentSequence.append(_disclaimer_container())

    sr = hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        institution_name=institution,
        is_complete=True,
        is_final=False,  # unverified machine output: PRELIMINARY, not FINAL
        is_verified=False,
        series_description=_short(f"AI results ({DISCLAIMER})"),
        specific_character_set=RESULT_CHARACTER_SET,
    )
    scheme = pydicom.Dataset()  # PS3.3 C.12.1.1.2.1: identify the private coding scheme
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "mosmedai AI findings and measurements"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


# ---------------------------------------------------------------------------------------
# Image quality

#: Display values at or below / at or above these count as saturated (1/255 of the range:
#: the first and last 8-bit display level).
SATURATION_LOW = 1.0 / 255.0
SATURATION_HIGH = 254.0 / 255.0
#: Wrong exposure: more than this share of the pixels saturated at one end. A normal
#: radiograph in its window keeps most of the field in the grey range; collimator edges
#: and air around the body saturate well under half of it.
SATURATED_SHARE_LIMIT = 0.5
#: Low contrast: the central 98 % of the display values (1st to 99th percentile) span less
#: than this share of the display range, or fewer than LOW_CONTRAST_MIN_LEVELS stored
#: levels - the image holds too few grey levels to show anatomy.
LOW_CONTRAST_DISPLAY_RANGE = 0.15
LOW_CONTRAST_MIN_LEVELS = 32
#: Cropped: the patient is wider than the field - both side edges run through anatomy.
#: A side edge counts when, along more than CROPPED_BORDER_SHARE of its rows, the
#: outermost band (BORDER_BAND_SHARE of the width, at least 2 pixels) is mostly anatomy:
#: display values in [CROP_ANATOMY_LOW, CROP_ANATOMY_HIGH]. The lower limit is above the
#: air around the patient (display ~0 in any sensible window) and below aerated lung, so a
#: field edge cutting through the lungs counts as well as one cutting the chest wall. The
#: upper limit leaves out collimator blades and burnt-in labels (flat white). Only the side
#: edges count: on a frontal radiograph and an axial CT slice the patient's sides belong
#: inside the field, while head and feet legitimately run past the top and bottom (neck,
#: abdomen). Both sides are required: a body touching one edge is common with off-centre
#: positioning (one side alone flagged about a fifth of the tightly framed chest phantoms
#: of mosmedai.phantoms.chest_xray; both sides flag 1 in 12, each with the body wall past
#: both edges).
BORDER_BAND_SHARE = 0.01
CROP_ANATOMY_LOW = 0.12
CROP_ANATOMY_HIGH = 0.95
CROPPED_BORDER_SHARE = 0.6


def image_quality_warnings(stored: np.ndarray, params: GrayscaleParams) -> list[str]:
    """Image-defect warnings from the stored values and the grayscale chain (empty when
    none): wrong exposure, low contrast, anatomy cut at a side edge. See the constants."""
    if stored.ndim != 2 or stored.size == 0:
        return []
    display = to_display(stored, params)
    warnings = []
    dark = float(np.mean(display <= SATURATION_LOW))
    bright = float(np.mean(display >= SATURATION_HIGH))
    if dark > SATURATED_SHARE_LIMIT or bright > SATURATED_SHARE_LIMIT:
        warnings.append(f"wrong exposure or window: {dark:.0%} of the image is saturated black and "
                        f"{bright:.0%} saturated white")
    low, high = np.percentile(display, (1, 99))
    stored_low, stored_high = np.percentile(stored, (1, 99))
    if not warnings and (high - low < LOW_CONTRAST_DISPLAY_RANGE or stored_high - stored_low < LOW_CONTRAST_MIN_LEVELS):
        warnings.append(f"low contrast: the central 98% of the image spans {high - low:.0%} of the display "
                        f"range ({int(stored_high - stored_low)} stored levels)")
    band = max(2, int(round(stored.shape[1] * BORDER_BAND_SHARE)))
    cut = []
    for side, strip in (("left", display[:, :band]), ("right", display[:, -band:])):
        anatomy = (strip >= CROP_ANATOMY_LOW) & (strip <= CROP_ANATOMY_HIGH)
        share = float(np.mean(anatomy.mean(axis=1) > 0.5))  # rows where the band is mostly anatomy
        if share > CROPPED_BORDER_SHARE:
            cut.append(f"{side} ({share:.0%} of the edge)")
    if len(cut) == 2:
        warnings.append("image may be cropped: anatomy touches the " + " and ".join(cut) + " edges")
    return warnings


# ---------------------------------------------------------------------------------------
# Secondary captures


def _stored_and_params(dataset: pydicom.Dataset) -> tuple[np.ndarray, GrayscaleParams]:
    """Stored values (uint16, signed shifted) and grayscale parameters, as dicom_input.decode."""
    stored = pixel_array(dataset)
    if stored.ndim == 3:
        stored = stored[0]
    signed = int(dataset.get("PixelRepresentation", 0) or 0) == 1
    if "ModalityLUTSequence" in dataset:
        stored = np.clip(apply_modality_lut(stored, dataset), 0, 65535).astype(np.uint16)
        params = grayscale_params(dataset, signed=False)
        return stored, GrayscaleParams(1.0, 0.0, params.window_center, params.window_width, params.voi_function,
                                       params.invert, params.lut_first_mapped, params.lut)
    if signed:
        stored = (stored.astype(np.int32) + SIGNED_SHIFT).astype(np.uint16)
    else:
        stored = stored.astype(np.uint16)
    return stored, grayscale_params(dataset, signed=signed)


def _display_params(params: GrayscaleParams, item: ItemResult) -> GrayscaleParams:
    """Volume families read HU in their window: show it where the header has none."""
    if params.voi_function != VoiFunction.AUTO:
        return params
    for result in item.tools:
        spec = CATALOG.get(result.tool)
        if spec is not None and spec.family.window is not None and item.kind == "volume":
            low, high = spec.family.window
            return GrayscaleParams(params.rescale_slope, params.rescale_intercept, (low + high) / 2.0,
                                   high - low, VoiFunction.LINEAR_EXACT, params.invert)
    return params


def _ascii(text: str) -> str:
    """Hershey fonts draw ASCII only."""
    return str(text).encode("ascii", "replace").decode("ascii")


def _format_value(value: float) -> str:
    return f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"


def _tool_line(result: ToolResult) -> str:
    parts = []
    probability = _probability(result, result.findings[0] if result.findings else None)
    verdict = "FOUND" if result.findings else "not found"
    parts.append(f"{verdict}" + (f" p={probability:.2f}" if probability is not None else ""))
    for measurement in result.measurements:
        if measurement.label is not None or measurement.unit == "{category}":
            parts.append(f"{measurement.name} {measurement.label if measurement.label is not None else measurement.value}")
        elif _finite(measurement.value):
            unit = {"[hnsf'U]": "HU", "deg": "deg"}.get(measurement.unit, measurement.unit)
            parts.append(f"{measurement.name} {_format_value(float(measurement.value))} {unit}")
        else:
            parts.append(f"{measurement.name} n/a")
    return f"{result.title}: " + ", ".join(parts)


def _wrap(text: str, width_px: int, scale: float, thickness: int) -> list[str]:
    words, lines, line = _ascii(text).split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if line and cv2.getTextSize(candidate, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0] > width_px:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines


#: Banner: dark band blended over the image (text contrast whatever the anatomy below).
BANNER_DARKEN = 0.2
BANNER_TEXT = (255, 255, 255)
DISCLAIMER_TEXT = (255, 220, 0)
WARNING_TEXT = (255, 160, 0)
BOX_COLOUR = (255, 40, 40)


def _draw_band(canvas: np.ndarray, lines: list[tuple[str, tuple[int, int, int]]], top: bool) -> tuple[int, int]:
    """Write lines on a darkened band at the top or bottom; returns the band's rows."""
    height, width = canvas.shape[:2]
    scale = float(np.clip(width / 1100.0, 0.35, 3.0))
    thickness = max(1, int(round(scale * 1.6)))
    margin = max(3, int(round(6 * scale)))
    wrapped = [(piece, colour) for text, colour in lines
               for piece in _wrap(text, width - 2 * margin, scale, thickness)]
    line_height = int(cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][1] * 1.9) + 1
    band = min(height, margin * 2 + line_height * len(wrapped))
    row0, row1 = (0, band) if top else (height - band, height)
    canvas[row0:row1] = (canvas[row0:row1].astype(np.float32) * BANNER_DARKEN).astype(np.uint8)
    y = row0 + margin
    for text, colour in wrapped:
        y += line_height
        if y > row1:
            break
        cv2.putText(canvas, text, (margin, y - line_height // 3), cv2.FONT_HERSHEY_SIMPLEX, scale, colour,
                    thickness, cv2.LINE_AA)
    return row0, row1


def _patient_orientation(dataset: pydicom.Dataset) -> tuple[str, str]:
    """The source's Patient Orientation, else derived from Image Orientation (Patient),
    else the radiographic convention for a frontal view (patient left on the image's
    right, feet down)."""
    value = dataset.get("PatientOrientation")
    if value and len(value) == 2 and all(_ORIENTATION_LETTERS.match(str(v)) for v in value):
        return str(value[0]), str(value[1])
    orientation = dataset.get("ImageOrientationPatient")
    if orientation and len(orientation) == 6:
        def letters(vector) -> str:
            names = (("L", "R"), ("P", "A"), ("H", "F"))
            order = np.argsort(-np.abs(vector))
            out = ""
            for axis in order:
                if abs(vector[axis]) > 0.25 and len(out) < 3:
                    out += names[axis][0] if vector[axis] > 0 else names[axis][1]
            return out or "L"
        vector = np.asarray([float(v) for v in orientation])
        return letters(vector[:3]), letters(vector[3:])
    return "L", "F"


def _key_sources(sources: Sequence[pydicom.Dataset], item: ItemResult, warnings: Sequence[str]) -> list[pydicom.Dataset]:
    """The images an item's captures show: each image with a located finding, or for an
    item with findings, measurements or warnings but no location, its image (a volume's
    middle slice)."""
    ordered = _ordered_sources(sources, item)
    chosen, seen = [], set()
    for result in item.tools:
        for finding in result.findings:
            image = _source_for(finding.location, ordered, item) if finding.location is not None else None
            if image is not None and str(image.SOPInstanceUID) not in seen:
                seen.add(str(image.SOPInstanceUID))
                chosen.append(image)
    anything = warnings or any(r.findings or r.measurements for r in item.tools)
    if not chosen and anything and ordered:
        chosen.append(ordered[0] if item.kind != "volume" else ordered[len(ordered) // 2])
    return chosen


def build_secondary_captures(source: pydicom.Dataset | Sequence[pydicom.Dataset], item: ItemResult,
                             warnings: list[str], *, series_instance_uid: str, series_number: int = SC_SERIES_NUMBER,
                             instance_number_start: int = 1) -> list[pydicom.Dataset]:
    """RGB secondary captures of the item's images with findings, measurements or warnings.

    ``source`` is the image (image item) or the series' slices (volume item; the key
    slices named by the findings' locations are drawn). Each capture shows the source in
    display, the boxes of the findings on it, a top banner with the disclaimer and one line
    per tool (title, found / not found, probability, measurements), and a bottom band with
    the image-quality ``warnings``. Empty when there is nothing to show.
    """
    sources = [source] if isinstance(source, pydicom.Dataset) else list(source)
    captures = []
    for number, image in enumerate(_key_sources(sources, item, warnings)):
        header = _header(image)
        stored, params = _stored_and_params(image)
        shown = to_display(stored, _display_params(params, item))
        canvas = np.repeat(np.rint(shown * 255.0).astype(np.uint8)[:, :, None], 3, axis=2)
        height, width = canvas.shape[:2]
        thickness = max(2, int(round(max(height, width) / 300)))
        uid = str(image.SOPInstanceUID)
        for result in item.tools:
            for finding in result.findings:
                if finding.location is None or _source_for(finding.location, sources, item) is None:
                    continue
                if str(_source_for(finding.location, sources, item).SOPInstanceUID) != uid:
                    continue
                row0, col0, row1, col1 = _box(finding.location, image)
                cv2.rectangle(canvas, (int(round(col0)), int(round(row0))),
                              (max(int(round(col1)) - 1, 0), max(int(round(row1)) - 1, 0)), BOX_COLOUR, thickness)
        banner = [(f"{DISCLAIMER.upper()}", DISCLAIMER_TEXT)] + [(_tool_line(r), BANNER_TEXT) for r in item.tools]
        _draw_band(canvas, banner, top=True)
        if warnings:
            _draw_band(canvas, [("Image quality: " + "; ".join(warnings), WARNING_TEXT)], top=False)
        spacing = header.get("PixelSpacing")  # valid or absent (see _header)
        orientation = _patient_orientation(header)
        capture = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header,
            pixel_array=canvas,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=instance_number_start + number,
            manufacturer=MANUFACTURER,
            pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing and len(spacing) == 2 else None,
            laterality=_laterality(header),
            # highdicom takes one letter per direction; the full value is set below
            patient_orientation=(orientation[0][0], orientation[1][0]),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=_short(f"AI results ({DISCLAIMER})"),
            specific_character_set=RESULT_CHARACTER_SET,
        )
        # PS3.3 C.7.6.1.1.1: a direction may take up to three letters (a mammogram's MLO "FL")
        capture.PatientOrientation = list(orientation)
        body_part = _body_part(header, item)
        if body_part is not None:
            capture.BodyPartExamined = body_part
        if body_part is not None and not BODY_PARTS[body_part]:
            # General Series Laterality is type 2C (PS3.3 C.7.3.1): required for a paired body
            # part (the SC IOD has no Image Laterality), absent for an unpaired one.
            if "Laterality" in capture:
                del capture.Laterality
        elif "Laterality" not in capture:
            capture.Laterality = None  # paired or unknown body part, no L or R known: empty
        capture.BurnedInAnnotation = "YES"
        capture.DerivationDescription = _short(f"{DISCLAIMER}; source {uid}", 1024)
        capture.SourceImageSequence = [_reference(image)]
        captures.append(capture)
    return captures


#: Body Part Examined defined terms (PS3.16 Annex L) a capture may carry, and whether the
#: part is paired (then the capture's Laterality is required, else it must be absent).
BODY_PARTS = {"CHEST": False, "BREAST": True, "SPINE": False, "CSPINE": False, "TSPINE": False, "LSPINE": False,
              "HEAD": False, "BRAIN": False, "SKULL": False, "ABDOMEN": False}
#: Source values that name what a capture shows in other words (seen from real senders; a
#: chest CT labelled LUNG shows both lungs, which a Laterality of L or R cannot say).
BODY_PART_SYNONYMS = {"THORAX": "CHEST", "TORAX": "CHEST", "LUNG": "CHEST", "WHOLESPINE": "SPINE"}
#: What a family's tools read, for a source without a usable Body Part Examined.
FAMILY_BODY_PARTS = {"chest_xray": "CHEST", "fluorography": "CHEST", "mammography": "BREAST",
                     "spine_xray": "SPINE", "ct_brain": "HEAD", "ct_chest": "CHEST"}


def _body_part(header: pydicom.Dataset, item: ItemResult) -> str | None:
    """The capture's Body Part Examined: the source's when it is (or names) a defined term of
    BODY_PARTS, else what the item's tools read, else None."""
    value = str(header.get("BodyPartExamined") or "").strip().upper()
    value = BODY_PART_SYNONYMS.get(value, value)
    if value in BODY_PARTS:
        return value
    for result in item.tools:
        spec = CATALOG.get(result.tool)
        if spec is not None and spec.family.name in FAMILY_BODY_PARTS:
            return FAMILY_BODY_PARTS[spec.family.name]
    return None


def _laterality(dataset: pydicom.Dataset) -> str | None:
    value = str(dataset.get("ImageLaterality") or dataset.get("Laterality") or "").upper()
    return value if value in ("L", "R") else None


def _reference(dataset: pydicom.Dataset) -> pydicom.Dataset:
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = dataset.SOPClassUID
    reference.ReferencedSOPInstanceUID = dataset.SOPInstanceUID
    return reference


# ---------------------------------------------------------------------------------------
# Bundle


def _part10(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def result_objects(sources: list[pydicom.Dataset], item: ItemResult, warnings: list[str]) -> dict[str, bytes]:
    """The item's SR and secondary captures as Part-10 bytes: "sr.dcm", "sc-0001.dcm", ..."""
    objects = {"sr.dcm": _part10(build_sr(sources, item))}
    captures = build_secondary_captures(sources, item, warnings, series_instance_uid=generate_uid(),
                                        series_number=SC_SERIES_NUMBER)
    for number, capture in enumerate(captures, start=1):
        objects[f"sc-{number:04d}.dcm"] = _part10(capture)
    return objects


def study_objects(bodies: list[bytes], items, results) -> dict[str, bytes]:
    """SR and secondary captures of every item; names prefixed item-<n>/ when there are several."""
    sources = {}
    for body in bodies:
        dataset = pydicom.dcmread(io.BytesIO(body))
        sources[str(dataset.SOPInstanceUID)] = dataset
    objects: dict[str, bytes] = {}
    for number, (item, result) in enumerate(zip(items, results.results), start=1):
        warnings = image_quality_warnings(item.first.stored, item.first.params) if item.kind == IMAGE else []
        built = result_objects([sources[image.sop_instance_uid] for image in item.images], result, warnings)
        prefix = "" if len(items) == 1 else f"item-{number}/"
        objects.update({prefix + name: data for name, data in built.items()})
    return objects
