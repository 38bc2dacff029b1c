"""DICOM conformance of the result objects: dciodvfy (dicom3tools) checks every SR and
secondary capture against its IOD, 0 errors allowed; its warnings are listed.

- On the platform: every family's example (`mosmedai example`) goes through the
  asynchronous study API, and the SR and captures the platform stores for all 18 tools are
  fetched from /v1/studies/{uid}/sr and /sc and verified.
- Sources with what real modalities get wrong (a zero Pixel Spacing, a mammogram without
  its laterality, Cyrillic text under ISO_IR 144, Japanese under ISO 2022 code extensions,
  UTF-8 declared as ISO_IR 100 or not declared, Windows-1251 under a character set that
  does not exist, invalid dates and enumerations, a CT series without Body Part Examined):
  the derived objects pass, carry none of the invalid values, and fill what their own IOD
  requires - on the platform, and directly from results_dicom for the unit suite.
"""

from __future__ import annotations

import collections
import io
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pydicom
import pytest

from mosmedai.local import examples
from mosmedai.results import dicom_objects as rd
from mosmedai.pipeline.multipart import multipart_body, multipart_parts
from mosmedai.results.schemas import Finding, ItemResult, Location, MeasurementValue, ToolResult
from mosmedai.ingress.tenants import auth_headers
from mosmedai.catalog.tools import BUILTIN_TOOLS

SEED = 7_300_000
ASYNC = {"Prefer": "respond-async"}
CYRILLIC_NAME = "Иванов^Иван"
#: Alphabetic, ideographic and phonetic groups (PS3.5 H.3.1).
JAPANESE_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"
#: A placeholder of as many characters as CYRILLIC_NAME, swapped for its bytes in another
#: character set once the file is written (pydicom would not write bytes a set cannot hold).
PLACEHOLDER = "PLACEHOLDER"
assert len(PLACEHOLDER) == len(CYRILLIC_NAME)


# --- dciodvfy ---------------------------------------------------------------------------------
@dataclass
class Verdict:
    name: str
    iod: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def dciodvfy(data: bytes, folder: Path, name: str) -> Verdict:
    """dciodvfy's verdict on one Part-10 object: the IOD it recognised, its Error and Warning lines."""
    executable = shutil.which("dciodvfy")
    if executable is None:
        pytest.skip("dciodvfy is not installed (Debian package `dicom3tools`; `make install` installs it)")
    path = folder / name.replace("/", "-")
    path.write_bytes(data)
    answer = subprocess.run([executable, str(path)], capture_output=True, text=True, timeout=120)
    lines = (answer.stdout + answer.stderr).splitlines()
    iods = [line.strip() for line in lines if line.strip() and not line.startswith(("Error", "Warning"))]
    return Verdict(name, iods[0] if iods else "", [line for line in lines if line.startswith("Error")],
                   [line for line in lines if line.startswith("Warning")])


def warning_kind(line: str) -> str:
    """A warning without the element path and item numbers, so that kinds can be counted."""
    return re.sub(r"</[^>]*> - |\[\d+\]", "", line).strip()


def report(verdicts: list[Verdict], capsys, title: str) -> None:
    kinds = collections.Counter(warning_kind(line) for v in verdicts for line in v.warnings)
    with capsys.disabled():
        print(f"\n{title}: dciodvfy on {len(verdicts)} objects, "
              f"{sum(len(v.errors) for v in verdicts)} errors, {sum(kinds.values())} warnings")
        for kind, count in kinds.most_common():
            print(f"  {count:4d} x {kind}")


def assert_conformant(verdicts: list[Verdict]) -> None:
    assert verdicts
    wrong_iod = [(v.name, v.iod) for v in verdicts if v.iod not in ("Comprehensive3DSR", "SCImage")]
    assert not wrong_iod, f"dciodvfy did not recognise these as SR or SC: {wrong_iod}"
    errors = {v.name: v.errors for v in verdicts if v.errors}
    assert not errors, "dciodvfy errors:\n" + "\n".join(f"{name}:\n  " + "\n  ".join(lines)
                                                       for name, lines in errors.items())


# --- sources with what real modalities get wrong ----------------------------------------------
def part10(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def with_name_in(dataset: pydicom.Dataset, charset: str) -> bytes:
    """The dataset written in a declared Specific Character Set that holds Cyrillic (pydicom
    encodes every text value in it), Patient Name CYRILLIC_NAME."""
    dataset.SpecificCharacterSet = charset
    dataset.PatientName = CYRILLIC_NAME
    return part10(dataset)


def misdeclared(dataset: pydicom.Dataset, declared: str, codec: str) -> bytes:
    """The dataset written with CYRILLIC_NAME as Patient Name in `codec` bytes under a
    declared Specific Character Set that does not match them (a wrong one, one that is not a
    DICOM term, or none: `declared` empty). Other text stays ASCII, so that the tools are
    chosen as for any study (routing by a garbled description is not what is tested here)."""
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.PatientName = PLACEHOLDER
    data = part10(dataset)
    assert all(str(element.value).isascii() for element in dataset if element.VR in rd._TEXT_VRS), \
        "the other text values must be ASCII"
    encoded = CYRILLIC_NAME.encode(codec)
    name_field = encoded + b" " * (len(encoded) % 2)  # even value length, padded with a space
    old_field = PLACEHOLDER.encode() + b" " * (len(PLACEHOLDER) % 2)
    tag = b"\x10\x00\x10\x00PN"  # (0010,0010) PN, explicit VR little endian
    old = tag + len(old_field).to_bytes(2, "little") + old_field
    assert data.count(old) == 1
    data = data.replace(old, tag + len(name_field).to_bytes(2, "little") + name_field)
    charset_tag = b"\x08\x00\x05\x00CS"
    old_set = charset_tag + (10).to_bytes(2, "little") + b"ISO_IR 192"
    new_value = declared.encode() + b" " * (len(declared) % 2)
    assert data.count(old_set) == 1
    return data.replace(old_set, charset_tag + len(new_value).to_bytes(2, "little") + new_value)


@dataclass
class Faulty:
    """A study whose sources carry a fault, and what its derived objects must show instead."""

    name: str
    family: str
    bodies: list[bytes]
    patient_name: str | None = None  # the name every derived object must carry (decoded right)


def faulty_sources() -> list[Faulty]:
    cases = []
    chest = examples.make_example("chest_xray", SEED, "cxr_nodule").datasets[0]
    chest.PixelSpacing = chest.ImagerPixelSpacing = ["0", "0"]
    chest.PatientBirthDate = "19600230"  # February 30th
    chest.PatientSex = "male"  # not M, F or O
    chest.StudyDescription = "ОГК\x07"  # a control character (BEL)
    chest.PatientOrientation = ["X", "Y"]
    chest.Laterality = "left"
    cases.append(Faulty("zero spacing and invalid values", "chest_xray", [part10(chest)]))

    mammography = examples.make_example("mammography", SEED, "mg_mass")
    bodies = []
    for dataset in mammography.datasets:
        for keyword in ("ImageLaterality", "Laterality"):
            if keyword in dataset:
                delattr(dataset, keyword)
        dataset.SeriesDescription = "MAMMO screening"
        bodies.append(part10(dataset))
    cases.append(Faulty("mammograms without laterality", "mammography", bodies))

    fluorogram = examples.make_example("fluorography", SEED, "nodule").datasets[0]
    cases.append(Faulty("Cyrillic under ISO_IR 144", "fluorography",
                        [with_name_in(fluorogram, "ISO_IR 144")], CYRILLIC_NAME))

    spine = examples.make_example("spine_xray", SEED, "scoliosis").datasets[0]
    cases.append(Faulty("UTF-8 declared as ISO_IR 100", "spine_xray",
                        [misdeclared(spine, "ISO_IR 100", "utf-8")], CYRILLIC_NAME))

    other_chest = examples.make_example("chest_xray", SEED + 1, "cxr_opacity").datasets[0]
    cases.append(Faulty("Windows-1251 under an unknown character set", "chest_xray",
                        [misdeclared(other_chest, "WINDOWS-1251", "cp1251")], CYRILLIC_NAME))

    japanese = examples.make_example("spine_xray", SEED + 1, "scoliosis").datasets[0]
    japanese.SpecificCharacterSet = ["", "ISO 2022 IR 87"]  # code extensions (PS3.5 H.3.1)
    japanese.PatientName = JAPANESE_NAME
    cases.append(Faulty("Japanese under ISO 2022 code extensions", "spine_xray", [part10(japanese)], JAPANESE_NAME))

    head = examples.make_example("ct_brain", SEED, "haemorrhage").datasets
    for dataset in head:
        dataset.PatientBirthDate = "1960-01-31"  # not DA (YYYYMMDD)
    cases.append(Faulty("CT series with Cyrillic under ISO_IR 144 and a bad date", "ct_brain",
                        [with_name_in(dataset, "ISO_IR 144") for dataset in head], CYRILLIC_NAME))

    chest_ct = examples.make_example("ct_chest", SEED, "nodule").datasets
    for dataset in chest_ct:
        dataset.BodyPartExamined = ""  # routed by the series description; the capture names CHEST
        dataset.SeriesDescription = "CT CHEST"
    cases.append(Faulty("CT series with UTF-8 and no character set declared", "ct_chest",
                        [misdeclared(dataset, "", "utf-8") for dataset in chest_ct], CYRILLIC_NAME))
    return cases


def assert_nothing_invalid_copied(case: Faulty, objects: dict[str, bytes]) -> None:
    for name, data in objects.items():
        dataset = pydicom.dcmread(io.BytesIO(data))
        where = f"{case.name}: {name}"
        assert dataset.SpecificCharacterSet == rd.RESULT_CHARACTER_SET, where
        spacing = dataset.get("PixelSpacing")
        assert spacing is None or all(float(value) > 0 for value in spacing), where
        assert str(dataset.get("PatientBirthDate", "")) not in ("19600230", "1960-01-31"), where
        assert dataset.get("PatientSex", "") in ("", "M", "F", "O"), where
        assert "\x07" not in str(dataset.get("StudyDescription", "")), where
        assert dataset.get("Laterality") in (None, "", "L", "R"), where
        if case.patient_name is not None:
            assert str(dataset.PatientName) == case.patient_name, where
        if dataset.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage:
            assert all(re.fullmatch("[APRLHF]{1,3}", str(v)) for v in dataset.PatientOrientation), where
            if case.family == "ct_chest":
                assert dataset.BodyPartExamined == "CHEST" and "Laterality" not in dataset, where
            if case.family == "mammography":
                # BREAST is paired: Laterality present, empty since no source named L or R
                assert dataset.BodyPartExamined == "BREAST" and "Laterality" in dataset, where
                assert dataset.Laterality in ("", None), where


# --- unit suite: results_dicom on the faulty sources ------------------------------------------
def typical_result(family: str, sources: list[pydicom.Dataset]) -> ItemResult:
    """Results of the shape the family's tools answer (a located finding, a measurement)."""
    from mosmedai.catalog.tools import CATALOG

    first = sources[0]
    box = Location(row0=first.Rows * 0.3, col0=first.Columns * 0.3, row1=first.Rows * 0.5,
                   col1=first.Columns * 0.5)
    tools = []
    for spec in (spec for spec in CATALOG.values() if spec.family.name == family):
        measurements = [MeasurementValue(name=m.name, value=0 if m.labels else 12.5, unit=m.unit,
                                         label=m.labels[0] if m.labels else None) for m in spec.measurements]
        tools.append(ToolResult(tool=spec.name, title=spec.title, model_version="1",
                                findings=[Finding(finding=spec.finding, probability=0.9, location=box)],
                                scores={"probability": 0.9}, measurements=measurements))
    return ItemResult(series_instance_uid=str(first.SeriesInstanceUID), modality=str(first.Modality), kind="image",
                      sop_instance_uids=[str(first.SOPInstanceUID)], tools=tools)


def test_result_objects_of_faulty_sources_pass_dciodvfy(tmp_path, capsys):
    verdicts = []
    for case in faulty_sources():
        if case.family.startswith("ct_"):
            continue  # CT series: on the platform below, with the volume tools' real results
        for number, body in enumerate(case.bodies, start=1):
            source = pydicom.dcmread(io.BytesIO(body))
            objects = rd.result_objects([source], typical_result(case.family, [source]), ["low contrast: test"])
            assert any(name.startswith("sc-") for name in objects)
            assert_nothing_invalid_copied(case, objects)
            verdicts += [dciodvfy(data, tmp_path, f"{case.family}-{number}-{name}") for name, data in objects.items()]
    report(verdicts, capsys, "results_dicom on faulty sources")
    assert_conformant(verdicts)


def test_text_is_decoded_whatever_the_sender_declared():
    name = CYRILLIC_NAME.encode
    assert rd._decode_text(name("iso8859_5"), ["ISO_IR 144"]) == CYRILLIC_NAME
    assert rd._decode_text(name("utf-8"), ["ISO_IR 100"]) == CYRILLIC_NAME
    assert rd._decode_text(name("utf-8"), []) == CYRILLIC_NAME
    assert rd._decode_text(name("cp1251"), ["WINDOWS-1251"]) == CYRILLIC_NAME
    assert rd._decode_text("Müller^Jürgen".encode("latin_1"), ["ISO_IR 100"]) == "Müller^Jürgen"
    # ISO 2022 code extensions are pydicom's to decode
    source = examples.make_example("spine_xray", SEED).datasets[0]
    source.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    source.PatientName = JAPANESE_NAME
    header = rd._header(pydicom.dcmread(io.BytesIO(part10(source))))
    assert str(header.PatientName) == JAPANESE_NAME


# --- on the platform: every family's example, and the faulty sources --------------------------
@pytest.fixture(scope="module")
def gateway(platform):
    with httpx.Client(base_url=platform["gateway"], timeout=120.0, headers=auth_headers()) as client:
        yield client


def post(gateway, bodies: list[bytes]) -> str:
    """Submit a study asynchronously; its Study Instance UID."""
    if len(bodies) == 1:
        body, content_type = bodies[0], "application/dicom"
    else:
        body, content_type = multipart_body(bodies)
    answer = gateway.post("/v1/studies", content=body, headers={**ASYNC, "Content-Type": content_type})
    assert answer.status_code == 202, answer.text
    return str(pydicom.dcmread(io.BytesIO(bodies[0])).StudyInstanceUID)


def stored_objects(gateway, study_uid: str, timeout_s: float = 300.0) -> dict[str, bytes]:
    """Wait for the study, then the SR(s) and captures the platform stored for it."""
    deadline = time.monotonic() + timeout_s
    status = {}
    while time.monotonic() < deadline:
        status = gateway.get(f"/v1/studies/{study_uid}").json()
        if status["status"] in ("done", "failed"):
            break
        time.sleep(0.5)
    assert status.get("status") == "done", status
    objects = {}
    for kind in ("sr", "sc"):
        answer = gateway.get(f"/v1/studies/{study_uid}/{kind}")
        assert answer.status_code == 200, answer.text
        content_type = answer.headers["content-type"]
        parts = ([answer.content] if content_type.startswith("application/dicom")
                 else [part for _, part in multipart_parts(answer.content, content_type)])
        objects.update({f"{kind}-{number:02d}.dcm": part for number, part in enumerate(parts, start=1)})
    return objects


def family_tools(family: str) -> set[str]:
    from mosmedai.catalog.tools import CATALOG

    return {name for name, spec in CATALOG.items() if spec.family.name == family}


def algorithm_names(sr: pydicom.Dataset) -> set[str]:
    """Tool names of the SR's TID 4019 Algorithm Identification items (111001 Algorithm Name)."""
    found, stack = set(), list(sr.ContentSequence)
    while stack:
        item = stack.pop()
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111001":
            found.add(str(item.TextValue))
        stack += list(item.get("ContentSequence", []))
    return found


def test_every_tool_writes_conformant_sr_and_captures(gateway, tmp_path, capsys):
    studies = {family: post(gateway, [part10(ds) for ds in examples.make_example(family, SEED).datasets])
               for family in examples.FAMILIES}
    verdicts, reported = [], set()
    for family, study_uid in studies.items():
        objects = stored_objects(gateway, study_uid)
        srs = [pydicom.dcmread(io.BytesIO(data)) for name, data in objects.items() if name.startswith("sr-")]
        assert srs and any(name.startswith("sc-") for name in objects), (family, sorted(objects))
        reported |= {name for sr in srs for name in algorithm_names(sr)}
        verdicts += [dciodvfy(data, tmp_path, f"{family}-{name}") for name, data in objects.items()]
    report(verdicts, capsys, "platform results of every family's example")
    assert reported == set(BUILTIN_TOOLS), f"SRs name {sorted(reported)}"
    assert len(BUILTIN_TOOLS) == 18
    assert_conformant(verdicts)


def test_faulty_sources_give_conformant_results_on_the_platform(gateway, tmp_path, capsys):
    cases = faulty_sources()
    studies = [(case, post(gateway, case.bodies)) for case in cases]
    verdicts = []
    for case, study_uid in studies:
        objects = stored_objects(gateway, study_uid)
        assert_nothing_invalid_copied(case, objects)
        reported = {name for key, data in objects.items() if key.startswith("sr-")
                    for name in algorithm_names(pydicom.dcmread(io.BytesIO(data)))}
        assert reported == family_tools(case.family), f"{case.name}: the SRs name {sorted(reported)}"
        verdicts += [dciodvfy(data, tmp_path, f"{case.family}-{study_uid[-6:]}-{name}")
                     for name, data in objects.items()]
    report(verdicts, capsys, "platform results of faulty sources")
    assert_conformant(verdicts)
