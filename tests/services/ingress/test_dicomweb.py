"""DICOMweb under /dicomweb: STOW-RS in, QIDO-RS / WADO-RS over the tenant's result objects.

Unit tests of the pure parts (response module, DICOM XML, matching, content negotiation),
then the real platform driven by the stock `dicomweb-client` (and raw httpx where the
client hides the status code).
"""

import io
import time
import xml.etree.ElementTree as ET

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from mosmedai.ingress import dicomweb
from mosmedai.pipeline.errors import InputError
from mosmedai.ingress.dicomweb import (CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS, NATIVE_DICOM_NS, Part, ResultInstance,
                               check_dicom_accept, dataset_format, match_value, parse_query, search, store_response,
                               to_xml)
from mosmedai.pipeline.multipart import multipart_body, multipart_parts
from mosmedai.ingress.tenants import auth_headers
from mosmedai.phantoms.chest_xray import dicom_bytes, make_phantom, to_dataset

TEST_SEED = 7_100_001
NS = "{" + NATIVE_DICOM_NS + "}"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


# --- unit: Store Instances Response ----------------------------------------------------------------
def _part(sop: str, failure: int | None = None) -> Part:
    part = Part(b"", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", sop_instance_uid=sop, study_instance_uid="1.2.3")
    part.failure = failure
    return part


@pytest.mark.parametrize("failures, status", [((None, None), 200), ((None, CANNOT_UNDERSTAND), 202),
                                              ((CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS), 409)])
def test_store_response_status_and_sequences(failures, status):
    parts = [_part(f"1.2.3.{n}", failure) for n, failure in enumerate(failures)]
    code, response = store_response(parts, "http://x/dicomweb/studies/1.2.3")
    assert code == status
    stored = [p.sop_instance_uid for p in parts if p.failure is None]
    failed = {p.sop_instance_uid: p.failure for p in parts if p.failure is not None}
    assert [item.ReferencedSOPInstanceUID for item in response.get("ReferencedSOPSequence", [])] == stored
    assert {item.ReferencedSOPInstanceUID: item.FailureReason
            for item in response.get("FailedSOPSequence", [])} == failed
    assert response.RetrieveURL == "http://x/dicomweb/studies/1.2.3"
    # DICOM JSON round trip (what dicomweb-client does with it)
    again = Dataset.from_json(response.to_json_dict())
    assert [item.ReferencedSOPInstanceUID for item in again.get("ReferencedSOPSequence", [])] == stored


def test_failure_reasons_follow_ps3_18():
    assert dicomweb.failure_reason("not_dicom") == 0xC000
    assert dicomweb.failure_reason("corrupt_pixel_data") == 0xC000
    assert dicomweb.failure_reason("undecodable_transfer_syntax") == 0xC122
    assert dicomweb.failure_reason("study_mismatch") == 0xA900
    assert dicomweb.failure_reason("storage_unavailable") == 0xA700
    assert dicomweb.failure_reason("something else") == 0x0110


def test_check_part_names_a_corrupt_instance_and_a_study_mismatch():
    body = dicom_bytes(make_phantom((TEST_SEED, 1), shape=(256, 256), findings=[]))
    header = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True)
    corrupt = Part(body[: len(body) - 1000])
    dicomweb.check_part(corrupt, None, 50_000_000)
    assert corrupt.failure == CANNOT_UNDERSTAND and corrupt.sop_instance_uid == header.SOPInstanceUID
    other_study = Part(body)
    dicomweb.check_part(other_study, generate_uid(), 50_000_000)
    assert other_study.failure == DOES_NOT_MATCH_SOP_CLASS
    garbage = Part(b"not dicom at all")
    dicomweb.check_part(garbage, None, 50_000_000)
    assert garbage.failure == CANNOT_UNDERSTAND and garbage.sop_instance_uid == ""
    good = Part(body)
    dicomweb.check_part(good, str(header.StudyInstanceUID), 50_000_000)
    assert good.failure is None and good.image.sop_instance_uid == header.SOPInstanceUID


def test_a_part10_stream_without_preamble_is_accepted():
    dataset = to_dataset(make_phantom((TEST_SEED, 2), shape=(256, 256), findings=[]))
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset)  # as dicomweb-client writes it: no preamble, no 'DICM'
    part = Part(buffer.getvalue())
    dicomweb.check_part(part, None, 50_000_000)
    assert part.failure is None and part.body[128:132] == b"DICM"
    assert part.image.sop_instance_uid == dataset.SOPInstanceUID


# --- unit: DICOM XML ------------------------------------------------------------------------------
def test_xml_is_the_native_dicom_model():
    dataset = Dataset()
    dataset.PatientName = "Ivanov^Ivan=Иванов^Иван"
    dataset.ImageType = ["DERIVED", "PRIMARY"]
    dataset.Rows = 512
    dataset.RetrieveURL = ""
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.FailureReason = 0xC000
    dataset.FailedSOPSequence = [item]
    root = ET.fromstring(to_xml(dataset))
    assert root.tag == NS + "NativeDicomModel"
    by_keyword = {node.get("keyword"): node for node in root}
    assert [v.text for v in by_keyword["ImageType"].findall(NS + "Value")] == ["DERIVED", "PRIMARY"]
    assert by_keyword["Rows"].get("tag") == "00280010" and by_keyword["Rows"].get("vr") == "US"
    name = by_keyword["PatientName"].find(NS + "PersonName")
    assert name.get("number") == "1"
    assert name.find(f"{NS}Alphabetic/{NS}FamilyName").text == "Ivanov"
    assert name.find(f"{NS}Ideographic/{NS}GivenName").text == "Иван"
    assert by_keyword["RetrieveURL"].find(NS + "Value") is None
    failed_item = by_keyword["FailedSOPSequence"].find(NS + "Item")
    assert failed_item.get("number") == "1"
    reason = [n for n in failed_item if n.get("keyword") == "FailureReason"][0]
    assert reason.find(NS + "Value").text == str(0xC000)


# --- unit: negotiation and matching --------------------------------------------------------------
def test_accept_negotiation():
    assert dataset_format(None, multipart_xml=False) == "json"
    assert dataset_format("*/*", multipart_xml=False) == "json"
    assert dataset_format("application/dicom+xml", multipart_xml=False) == "xml"
    assert dataset_format('multipart/related; type="application/dicom+xml"', multipart_xml=True) == "xml"
    assert dataset_format("application/dicom+xml;q=0.5, application/dicom+json", multipart_xml=False) == "json"
    with pytest.raises(InputError) as refused:
        dataset_format("text/html", multipart_xml=False)
    assert refused.value.status == 406
    check_dicom_accept('multipart/related; type="application/dicom"; transfer-syntax=*')
    check_dicom_accept('multipart/related; type="application/dicom"')
    with pytest.raises(InputError):
        check_dicom_accept('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50')
    with pytest.raises(InputError):
        check_dicom_accept("image/jpeg")


def test_attribute_matching():
    assert match_value("StudyDate", "20240101-20241231", "20240615")
    assert not match_value("StudyDate", "20240101-20241231", "20250101")
    assert match_value("StudyDate", "-20240101", "20231231")
    assert match_value("PatientID", "PHANTOM-*", "PHANTOM-7-1")
    assert not match_value("PatientID", "OTHER*", "PHANTOM-7-1")
    assert match_value("PatientName", "ivanov^*", "IVANOV^IVAN")
    assert match_value("StudyInstanceUID", "1.2.3,1.2.4", "1.2.4")
    assert match_value("StudyInstanceUID", "1.2.3\\1.2.4", "1.2.3")
    assert not match_value("StudyInstanceUID", "1.2.3", "1.2.30")
    assert match_value("Modality", "", "SR")
    with pytest.raises(InputError):
        parse_query([("NoSuchKeyword", "x")])
    with pytest.raises(InputError):
        parse_query([("limit", "-1")])


def _result(study: str, series: str, sop: str, modality: str, patient: str = "P1") -> ResultInstance:
    header = Dataset()
    header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID = study, series, sop
    header.SOPClassUID = COMPREHENSIVE_3D_SR if modality == "SR" else "1.2.840.10008.5.1.4.1.1.7"
    header.Modality, header.PatientID, header.StudyDate = modality, patient, "20240615"
    header.SeriesNumber, header.InstanceNumber = 9001 if modality == "SR" else 9002, 1
    return ResultInstance("job", 0.0, "sr.dcm", "key", header)


def test_search_levels_counts_and_paging():
    instances = [_result("1.1", "1.1.1", "1.1.1.1", "SR"), _result("1.1", "1.1.2", "1.1.2.1", "OT"),
                 _result("1.1", "1.1.2", "1.1.2.2", "OT"), _result("1.2", "1.2.1", "1.2.1.1", "SR", "P2")]
    studies = search("study", instances, parse_query([]), "http://x/dicomweb")
    assert [s.StudyInstanceUID for s in studies] == ["1.1", "1.2"]
    assert studies[0].NumberOfStudyRelatedInstances == 3 and studies[0].NumberOfStudyRelatedSeries == 2
    assert list(studies[0].ModalitiesInStudy) == ["OT", "SR"]
    assert studies[0].RetrieveURL == "http://x/dicomweb/studies/1.1"
    assert [s.StudyInstanceUID for s in search("study", instances, parse_query([("PatientID", "P2")]), "")] == ["1.2"]
    only_ot = search("study", instances, parse_query([("ModalitiesInStudy", "OT")]), "")
    assert [s.StudyInstanceUID for s in only_ot] == ["1.1"]
    series = search("series", instances, parse_query([("00080060", "OT")]), "")
    assert [(s.SeriesInstanceUID, s.NumberOfSeriesRelatedInstances) for s in series] == [("1.1.2", 2)]
    paged = search("instance", instances, parse_query([("limit", "2"), ("offset", "1")]), "")
    assert [i.SOPInstanceUID for i in paged] == ["1.1.2.1", "1.1.2.2"]
    with_field = search("study", instances, parse_query([("includefield", "PatientAge")]), "")
    assert "PatientAge" in with_field[0] and with_field[0].PatientAge in (None, "")


# --- the real platform ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(platform):
    return f"{platform['gateway']}/dicomweb"


@pytest.fixture(scope="module")
def client(base):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=base, headers=auth_headers())


@pytest.fixture(scope="module")
def stored(client, base):
    """A chest X-ray stored by STOW-RS, and its study once the results are searchable."""
    dataset = to_dataset(make_phantom((TEST_SEED, 10), shape=(1200, 1000), findings=["cxr_opacity"]))
    study = str(dataset.StudyInstanceUID)
    response = client.store_instances([dataset])
    assert [item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence] == [dataset.SOPInstanceUID]
    assert "FailedSOPSequence" not in response or not response.FailedSOPSequence
    assert response.RetrieveURL.endswith(f"/dicomweb/studies/{study}")
    deadline = time.monotonic() + 180
    while True:
        found = client.search_for_studies(search_filters={"StudyInstanceUID": study})
        if found:
            break
        assert time.monotonic() < deadline, "the results of the stored study never became searchable"
        time.sleep(1.0)
    return dataset, found


def _multipart(bodies: list[bytes]) -> tuple[bytes, dict]:
    body, content_type = multipart_body(bodies)
    return body, {"Content-Type": content_type}


def test_stow_then_qido_finds_the_result_study(stored):
    dataset, found = stored
    study, = found
    assert study["0020000D"]["Value"] == [dataset.StudyInstanceUID]
    assert "SR" in study["00080061"]["Value"]  # ModalitiesInStudy
    assert study["00201208"]["Value"][0] >= 2  # NumberOfStudyRelatedInstances: SR + SC
    assert study["00100020"]["Value"] == [dataset.PatientID]


def test_qido_series_and_instances(stored, client):
    dataset, _ = stored
    series = client.search_for_series(dataset.StudyInstanceUID)
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    assert "SR" in modalities and "OT" in modalities, modalities
    sr_series = next(s for s in series if s["00080060"]["Value"] == ["SR"])
    instances = client.search_for_instances(dataset.StudyInstanceUID, sr_series["0020000E"]["Value"][0])
    assert len(instances) == 1 and instances[0]["00080016"]["Value"] == [COMPREHENSIVE_3D_SR]
    # the original (DX) is never searchable here
    everything = client.search_for_instances(dataset.StudyInstanceUID)
    assert dataset.SOPInstanceUID not in [i["00080018"]["Value"][0] for i in everything]
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY-*"}) == []


def test_wado_retrieves_the_sr_and_the_study(stored, client):
    dataset, _ = stored
    objects = client.retrieve_study(dataset.StudyInstanceUID)
    assert {o.Modality for o in objects} >= {"SR", "OT"}
    sr = next(o for o in objects if o.Modality == "SR")
    assert sr.StudyInstanceUID == dataset.StudyInstanceUID and sr.SOPClassUID == COMPREHENSIVE_3D_SR
    again = client.retrieve_instance(dataset.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    buffer = io.BytesIO()
    again.save_as(buffer, enforce_file_format=True)
    reread = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert reread.SOPInstanceUID == sr.SOPInstanceUID and reread.ContentSequence
    series = client.retrieve_series(dataset.StudyInstanceUID, sr.SeriesInstanceUID)
    assert [o.SOPInstanceUID for o in series] == [sr.SOPInstanceUID]
    metadata = client.retrieve_study_metadata(dataset.StudyInstanceUID)
    assert len(metadata) == len(objects) and all("7FE00010" not in m for m in metadata)


def test_another_tenant_sees_nothing(stored, base, platform):
    from dicomweb_client.api import DICOMwebClient

    dataset, _ = stored
    other = DICOMwebClient(url=base, headers=auth_headers("demo-tatarstan-token"))
    assert other.search_for_studies(search_filters={"StudyInstanceUID": dataset.StudyInstanceUID}) == []
    assert other.search_for_series(dataset.StudyInstanceUID) == []
    headers = auth_headers("demo-tatarstan-token")
    unknown = httpx.get(f"{base}/studies/{generate_uid()}", headers=headers)
    foreign = httpx.get(f"{base}/studies/{dataset.StudyInstanceUID}", headers=headers)
    assert unknown.status_code == foreign.status_code == 404
    assert unknown.json()["error"] == foreign.json()["error"] == "not_found"


def test_stow_with_a_corrupt_part_is_202_naming_it(base):
    good = dicom_bytes(make_phantom((TEST_SEED, 20), shape=(900, 760), findings=[]))
    bad_source = dicom_bytes(make_phantom((TEST_SEED, 21), shape=(900, 760), findings=[]))
    corrupt = bad_source[: len(bad_source) // 2]  # the pixel data cut short
    corrupt_uid = str(pydicom.dcmread(io.BytesIO(bad_source), stop_before_pixels=True).SOPInstanceUID)
    good_uid = str(pydicom.dcmread(io.BytesIO(good), stop_before_pixels=True).SOPInstanceUID)
    body, headers = _multipart([good, corrupt])
    answer = httpx.post(f"{base}/studies", content=body, headers={**headers, **auth_headers()}, timeout=60)
    assert answer.status_code == 202, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    response = Dataset.from_json(answer.json())
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in response.FailedSOPSequence] == \
        [(corrupt_uid, 0xC000)]
    assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == [good_uid]


def test_stow_answers_dicom_xml(base):
    good = dicom_bytes(make_phantom((TEST_SEED, 30), shape=(800, 700), findings=[]))
    body, headers = _multipart([good, b"garbage"])
    answer = httpx.post(f"{base}/studies", content=body, timeout=60,
                        headers={**headers, **auth_headers(), "Accept": "application/dicom+xml"})
    assert answer.status_code == 202, answer.text
    assert answer.headers["content-type"] == "application/dicom+xml"
    root = ET.fromstring(answer.content)
    assert root.tag == NS + "NativeDicomModel"
    keywords = {node.get("keyword") for node in root}
    assert {"RetrieveURL", "ReferencedSOPSequence", "FailedSOPSequence"} <= keywords


def test_stow_refusals(base):
    good = dicom_bytes(make_phantom((TEST_SEED, 40), shape=(800, 700), findings=[]))
    body, headers = _multipart([good])
    post = lambda url, **extra: httpx.post(url, content=body, timeout=60,  # noqa: E731
                                           headers={**headers, **auth_headers(), **extra})
    # the study in the URL is not the instance's: nothing stored, 409 with A900
    mismatch = post(f"{base}/studies/{generate_uid()}")
    assert mismatch.status_code == 409, mismatch.text
    assert Dataset.from_json(mismatch.json()).FailedSOPSequence[0].FailureReason == 0xA900
    assert post(f"{base}/studies", Accept="text/html").status_code == 406
    assert httpx.post(f"{base}/studies", content=good, headers={"Content-Type": "application/dicom",
                                                                 **auth_headers()}).status_code == 415
    assert httpx.post(f"{base}/studies", content=body, headers=headers).status_code == 401
    assert httpx.get(f"{base}/studies").status_code == 401


def test_stow_body_limits(base, platform_settings):
    limit = platform_settings.max_instances_per_request
    body, headers = _multipart([b"x"] * (limit + 1))
    answer = httpx.post(f"{base}/studies", content=body, headers={**headers, **auth_headers()}, timeout=60)
    assert answer.status_code == 413 and str(limit) in answer.json()["detail"]


def test_multipart_helpers_agree():
    body, content_type = multipart_body([b"a", b"bc"])
    assert [payload for _, payload in multipart_parts(body, content_type)] == [b"a", b"bc"]
