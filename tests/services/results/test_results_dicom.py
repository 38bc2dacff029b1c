"""DICOM result objects: the TID 1500 SR, the secondary captures and the quality checks,
built from synthetic sources and re-read with highdicom and pydicom (no mocks)."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, generate_uid

from mosmedai.results import dicom_objects as rd
from mosmedai.phantoms.dicom_build import build_dataset, ct_series
from mosmedai.catalog.imaging import GrayscaleParams, VoiFunction, to_display
from mosmedai.results.schemas import Finding, ItemResult, Location, MeasurementValue, ToolResult

PATIENT = dict(PatientName="Ivanov^Ivan", PatientID="P-0042", PatientBirthDate="19600131", PatientSex="M",
               AccessionNumber="ACC-7", ReferringPhysicianName="Petrov^Petr", StudyID="ST-9")
BOX = Location(row0=260.0, col0=150.0, row1=360.0, col1=270.0)


def chest_pixels(rows: int = 512, columns: int = 512) -> np.ndarray:
    """A plain chest-like radiograph: air around, a body with two dark lungs and a spine."""
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    image = np.full((rows, columns), 250.0, np.float32)  # air
    body = ((x - columns / 2) / (columns * 0.40)) ** 2 + ((y - rows * 0.55) / (rows * 0.55)) ** 2 < 1
    image[body] = 2200.0
    for centre in (0.32, 0.68):
        lung = ((x - columns * centre) / (columns * 0.13)) ** 2 + ((y - rows * 0.45) / (rows * 0.28)) ** 2 < 1
        image[lung] = 900.0
    image[:, int(columns * 0.47):int(columns * 0.53)][body[:, int(columns * 0.47):int(columns * 0.53)]] = 3200.0
    noise = np.random.default_rng(0).normal(0.0, 40.0, image.shape)
    return np.clip(image + noise, 0, 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def cxr() -> pydicom.Dataset:
    return build_dataset(chest_pixels(), modality="DX", bits_stored=12, PatientOrientation=["L", "F"],
                         ViewPosition="PA", BodyPartExamined="CHEST", PixelSpacing=["0.7", "0.7"],
                         ImagerPixelSpacing=["0.7", "0.7"], **PATIENT)


def cxr_item(source: pydicom.Dataset, *, tool: str = "cxr_nodule", finding: str = "focal lung nodule") -> ItemResult:
    return ItemResult(
        series_instance_uid=source.SeriesInstanceUID, modality="DX", kind="image",
        sop_instance_uids=[source.SOPInstanceUID],
        tools=[
            ToolResult(tool=tool, title="Chest X-ray: focal nodule", model_version="7",
                       findings=[Finding(finding=finding, probability=0.91, location=BOX)],
                       scores={"probability": 0.91},
                       measurements=[MeasurementValue(name="nodule_diameter_mm", value=14.5, unit="mm"),
                                     MeasurementValue(name="severity", value=2, unit="{category}", label="CT-2")]),
            ToolResult(tool="cxr_pneumothorax", title="Chest X-ray: pneumothorax", model_version="3",
                       findings=[], scores={"probability": 0.04}),
        ],
    )


@pytest.fixture(scope="module")
def ct() -> list[pydicom.Dataset]:
    hu = np.full((6, 256, 256), -1000.0, np.float32)
    hu[:, 30:226, 30:226] = 40.0
    hu[:, 60:200, 50:120] = -850.0
    return ct_series(hu, (5.0, 0.8, 0.8), **PATIENT)


def ct_item(slices: list[pydicom.Dataset], key: int = 3) -> ItemResult:
    location = Location(row0=150, col0=60, row1=200, col1=110, slice_index=key,
                        sop_instance_uid=slices[key].SOPInstanceUID)
    return ItemResult(
        series_instance_uid=slices[0].SeriesInstanceUID, modality="CT", kind="volume",
        sop_instance_uids=[ds.SOPInstanceUID for ds in slices],
        tools=[ToolResult(tool="ct_covid", title="CT chest: COVID-19 pneumonia", model_version="2",
                          findings=[Finding(finding="ground glass opacities", probability=0.8, location=location)],
                          scores={"probability": 0.8},
                          measurements=[MeasurementValue(name="involvement_percent", value=35.0, unit="%"),
                                        MeasurementValue(name="vertebral_hu", value=None, unit="[hnsf'U]"),
                                        MeasurementValue(name="ct_category", value=2, unit="{category}",
                                                         label="CT-2")])],
    )


def reread(dataset: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def walk(items):
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def algorithm(group) -> tuple[str, str]:
    """(name, version) of a measurement group's TID 4019 Algorithm Identification."""
    values = {item.ConceptNameCodeSequence[0].CodeValue: str(item.TextValue)
              for item in group[0].ContentSequence if item.ValueType == "TEXT"}
    return values["111001"], values["111003"]


def texts(sr: pydicom.Dataset) -> list[str]:
    return [str(item.TextValue) for item in walk(sr.ContentSequence) if item.ValueType == "TEXT"]


def assert_patient_study(result: pydicom.Dataset, source: pydicom.Dataset) -> None:
    for keyword in rd.PATIENT_STUDY_KEYWORDS:
        assert str(result.get(keyword, "")) == str(source.get(keyword, "")), keyword


def assert_new_uids(result: pydicom.Dataset, source: pydicom.Dataset) -> None:
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
        uid = UID(str(result[keyword].value))
        assert uid.is_valid, keyword
        assert uid != source[keyword].value, keyword
    assert result.SOPInstanceUID == result.file_meta.MediaStorageSOPInstanceUID


# ------------------------------------------------------------------------------ SR


def test_sr_is_a_valid_tid1500_report(cxr):
    sr = reread(rd.build_sr([cxr], cxr_item(cxr), institution="Clinic 1"))
    read = hd.sr.srread(io.BytesIO(rd._part10(sr)))
    assert isinstance(read, hd.sr.Comprehensive3DSR)
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    report = parsed.content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.Manufacturer == "mosmedai" and sr.InstitutionName == "Clinic 1"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"

    observers = report.get_observer_contexts()
    device = [o for o in observers if o.observer_type == hd.sr.CodedConcept("121007", "DCM", "Device")]
    assert device and device[0].observer_identifying_attributes.manufacturer_name == "mosmedai"
    procedure = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "399208008"  # SCT Plain chest X-ray

    planar = report.get_planar_roi_measurement_groups()
    assert len(planar) == 1
    group = planar[0]
    assert group.finding_type == hd.sr.CodedConcept("27925004", "SCT", "Nodule")
    assert algorithm(group) == ("cxr_nodule", "7")
    diameter = group.get_measurements(name=rd.measurement_code("cxr_nodule", "nodule_diameter_mm"))
    assert len(diameter) == 1 and diameter[0].value == pytest.approx(14.5) and diameter[0].unit.value == "mm"
    assert diameter[0].unit.scheme_designator == "UCUM"
    probability = group.get_measurements(name=rd.PROBABILITY)
    assert probability[0].value == pytest.approx(0.91)
    evaluations = {e.name.meaning: e.value for e in group.get_qualitative_evaluations()}
    assert evaluations["Nodule"] == rd.PRESENT
    assert evaluations["severity"].meaning == "CT-2" and evaluations["severity"].scheme_designator == "99MOSMEDAI"

    # The box as a closed polyline in (column, row) source pixels on the source image.
    roi = group.roi
    assert roi.GraphicType == "POLYLINE"
    assert roi.value.tolist() == [[150, 260], [270, 260], [270, 360], [150, 360], [150, 260]]
    assert roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == cxr.SOPInstanceUID

    # The negative tool: a group that says the finding is absent, with its probability.
    others = report.get_image_measurement_groups()
    absent = [g for g in others if algorithm(g)[0] == "cxr_pneumothorax"]
    assert len(absent) == 1
    assert {e.name.value: e.value for e in absent[0].get_qualitative_evaluations()}["36118008"] == rd.ABSENT

    assert rd.DISCLAIMER in texts(sr)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == cxr.SOPInstanceUID
    assert_patient_study(sr, cxr)
    assert_new_uids(sr, cxr)


def test_sr_uids_are_new_each_time(cxr):
    one, two = rd.build_sr([cxr], cxr_item(cxr)), rd.build_sr([cxr], cxr_item(cxr))
    assert one.SOPInstanceUID != two.SOPInstanceUID and one.SeriesInstanceUID != two.SeriesInstanceUID


def test_unknown_tool_falls_back_to_private_codes(cxr):
    sr = reread(rd.build_sr([cxr], cxr_item(cxr, tool="xx_future_tool_not_in_catalog", finding="a brand-new sign")))
    group = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_planar_roi_measurement_groups()[0]
    assert group.finding_type.scheme_designator == "99MOSMEDAI"
    assert len(group.finding_type.value) <= 16
    assert group.finding_type.meaning == "a brand-new sign"
    assert algorithm(group)[0] == "xx_future_tool_not_in_catalog"


def test_every_catalog_tool_has_a_finding_code():
    from mosmedai.catalog.tools import CATALOG

    for name, spec in CATALOG.items():
        concept = rd.finding_code(name)
        assert concept.value and concept.meaning and len(concept.value) <= 16, name
        for measurement in spec.measurements:
            assert rd.measurement_code(name, measurement.name).value


def test_tool_versions_fill_a_missing_model_version(cxr):
    item = cxr_item(cxr)
    item.tools[0].model_version = ""
    sr = reread(rd.build_sr([cxr], item, tool_versions={"cxr_nodule": "11"}))
    group = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_planar_roi_measurement_groups()[0]
    assert algorithm(group)[1] == "11"


def test_volume_sr_points_at_the_key_slice(ct):
    item = ct_item(ct)
    sr = reread(rd.build_sr(ct, item))
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    group = report.get_planar_roi_measurement_groups()[0]
    assert group.finding_type == hd.sr.CodedConcept("112120", "DCM", "Ground glass opacity")
    reference = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == ct[3].SOPInstanceUID
    involvement = group.get_measurements(name=rd.measurement_code("ct_covid", "involvement_percent"))
    assert involvement[0].value == pytest.approx(35.0) and involvement[0].unit.value == "%"
    # a null measurement is left out, the category is a qualitative evaluation
    assert not group.get_measurements(name=rd.measurement_code("ct_covid", "vertebral_hu"))
    assert any(e.value.meaning == "CT-2" for e in group.get_qualitative_evaluations())
    referenced = {s.ReferencedSOPInstanceUID
                  for seq in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence")
                  for study in sr.get(seq, []) for series in study.ReferencedSeriesSequence
                  for s in series.ReferencedSOPSequence}
    assert referenced == {ds.SOPInstanceUID for ds in ct}
    assert_patient_study(sr, ct[0])
    assert sr.StudyInstanceUID == ct[0].StudyInstanceUID


# ------------------------------------------------------------------------------ SC


def plain_display(source: pydicom.Dataset) -> np.ndarray:
    stored, params = rd._stored_and_params(source)
    return np.rint(to_display(stored, params) * 255.0).astype(np.uint8)


def test_secondary_capture_has_banner_and_box(cxr):
    series = generate_uid()
    captures = rd.build_secondary_captures(cxr, cxr_item(cxr), ["low contrast"], series_instance_uid=series,
                                           series_number=42, instance_number_start=5)
    assert len(captures) == 1
    sc = reread(captures[0])
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.PhotometricInterpretation == "RGB" and sc.BitsAllocated == 8
    assert (sc.Rows, sc.Columns) == (cxr.Rows, cxr.Columns)
    assert sc.SeriesInstanceUID == series and sc.SeriesNumber == 42 and sc.InstanceNumber == 5
    assert sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == cxr.SOPInstanceUID
    assert_patient_study(sc, cxr)
    assert_new_uids(sc, cxr)

    pixels = sc.pixel_array.astype(int)
    plain = plain_display(cxr).astype(int)
    # untouched image: grey, equal to the plain display
    assert np.array_equal(pixels[200, 400], [plain[200, 400]] * 3)
    # the banner: the top rows differ from the plain display (darkened, text written)
    top = np.abs(pixels[:40].mean(axis=2) - plain[:40]) > 8
    assert top.mean() > 0.05
    # the warnings band at the bottom
    assert (np.abs(pixels[-12:].mean(axis=2) - plain[-12:]) > 8).mean() > 0.05
    # the box: red on its edges where the location says, grey inside
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    row_mid, col_mid = int((BOX.row0 + BOX.row1) / 2), int((BOX.col0 + BOX.col1) / 2)
    assert red[row_mid, int(BOX.col0)] and red[row_mid, int(BOX.col1) - 1]
    assert red[int(BOX.row0), col_mid] and red[int(BOX.row1) - 1, col_mid]
    assert not red[row_mid, col_mid]
    assert not red[:, :100].any()  # nothing red away from the box


def test_no_capture_without_findings_measurements_or_warnings(cxr):
    item = ItemResult(series_instance_uid=cxr.SeriesInstanceUID, modality="DX", kind="image",
                      sop_instance_uids=[cxr.SOPInstanceUID],
                      tools=[ToolResult(tool="cxr_nodule", title="t", model_version="1", findings=[],
                                        scores={"probability": 0.1})])
    assert rd.build_secondary_captures(cxr, item, [], series_instance_uid=generate_uid(), series_number=1) == []
    assert len(rd.build_secondary_captures(cxr, item, ["wrong exposure"], series_instance_uid=generate_uid(),
                                           series_number=1)) == 1


def test_volume_capture_shows_the_key_slice(ct):
    captures = rd.build_secondary_captures(ct, ct_item(ct, key=2), [], series_instance_uid=generate_uid(),
                                           series_number=3)
    assert len(captures) == 1
    sc = reread(captures[0])
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ct[2].SOPInstanceUID
    assert list(sc.PatientOrientation) == ["L", "P"]
    pixels = sc.pixel_array.astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    assert red[175, 60] and red[175, 109] and not red[175, 85]
    assert_patient_study(sc, ct[0])


# ------------------------------------------------------------------------------ quality


def params_of(dataset: pydicom.Dataset) -> tuple[np.ndarray, GrayscaleParams]:
    return rd._stored_and_params(dataset)


def test_quality_quiet_on_a_normal_image(cxr):
    assert rd.image_quality_warnings(*params_of(cxr)) == []


def test_quality_quiet_on_normal_phantoms():
    from mosmedai.phantoms.chest_xray import make_phantom

    for seed in (0, 1, 2, 3):
        phantom = make_phantom(seed, shape=(512, 448))
        assert rd.image_quality_warnings(phantom.stored, phantom.params) == [], seed


def test_quality_flags_saturation():
    pixels = chest_pixels()
    window = GrayscaleParams(window_center=400.0, window_width=200.0, voi_function=VoiFunction.LINEAR)
    warnings = rd.image_quality_warnings(pixels, window)  # window far below the body: burnt white
    assert len(warnings) == 1 and "exposure" in warnings[0]
    burnt = pixels.copy()
    burnt[:, :] = np.where(burnt > 500, 4095, burnt)  # detector saturated over the body
    assert any("exposure" in w for w in rd.image_quality_warnings(burnt, GrayscaleParams()))


def test_quality_flags_cropping():
    pixels = chest_pixels()
    cropped = pixels[:, 110:-110]  # the body runs past both side edges
    warnings = rd.image_quality_warnings(cropped, GrayscaleParams())
    assert len(warnings) == 1 and "cropped" in warnings[0]


def test_quality_flags_low_contrast():
    flat = np.full((256, 256), 1000, np.uint16) + np.random.default_rng(1).integers(0, 12, (256, 256)).astype(np.uint16)
    warnings = rd.image_quality_warnings(flat, GrayscaleParams())
    assert any("low contrast" in w for w in warnings)


# ------------------------------------------------------------------------------ bundle


def test_result_objects_are_part10_files(cxr, ct):
    objects = rd.result_objects([cxr], cxr_item(cxr), ["image may be cropped"])
    assert sorted(objects) == ["sc-0001.dcm", "sr.dcm"]
    sr = pydicom.dcmread(io.BytesIO(objects["sr.dcm"]))
    sc = pydicom.dcmread(io.BytesIO(objects["sc-0001.dcm"]))
    assert sr.file_meta.MediaStorageSOPClassUID == sr.SOPClassUID
    assert sc.StudyInstanceUID == sr.StudyInstanceUID == cxr.StudyInstanceUID
    assert sc.SeriesInstanceUID != sr.SeriesInstanceUID
    volume = rd.result_objects(ct, ct_item(ct), [])
    assert sorted(volume) == ["sc-0001.dcm", "sr.dcm"]
