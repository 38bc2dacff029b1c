"""Integrator interfaces on the real platform: tenants, the asynchronous study API with
its DICOM results, gRPC (Open Inference Protocol and the study service), and nothing lost
when the router or Triton dies mid-way."""

import concurrent.futures
import io
import json
import os
import signal
import time

import grpc
import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
import tritonclient.grpc as triton_grpc

from mosmedai.local import processes as local
from mosmedai.ingress.grpc_api import studies_pb2, studies_pb2_grpc
from mosmedai.pipeline.multipart import multipart_parts
from mosmedai.jobs.storage import ObjectStore
from mosmedai.ingress.tenants import auth_headers
from mosmedai.phantoms.chest_xray import dicom_bytes, make_phantom, to_dataset

SEED = 7_100_000
MOSCOW = auth_headers("demo-moscow-token")
TATARSTAN = auth_headers("demo-tatarstan-token")
DICOM = {"Content-Type": "application/dicom"}
ASYNC = {**DICOM, "Prefer": "respond-async"}


def chest(index: int, findings=("cxr_nodule",)) -> bytes:
    return dicom_bytes(make_phantom((SEED, index), shape=(640, 560), findings=list(findings)))


@pytest.fixture(scope="module")
def gateway(platform):
    with httpx.Client(base_url=platform["gateway"], timeout=120.0) as client:
        yield client


def wait_done(gateway, study_uid: str, headers=MOSCOW, timeout_s: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = gateway.get(f"/v1/studies/{study_uid}", headers=headers).json()
        if status["status"] in ("done", "failed"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"study {study_uid} not done after {timeout_s} s: {status}")


def sr_texts(dataset) -> list[str]:
    """Every Text Value in an SR content tree."""
    texts = [str(dataset.TextValue)] if "TextValue" in dataset else []
    for item in dataset.get("ContentSequence", []):
        texts += sr_texts(item)
    return texts


def test_every_request_outside_health_needs_a_tenant_token(gateway):
    body = chest(1)
    for method, path, kwargs in (("POST", "/v1/studies", {"content": body, "headers": DICOM}),
                                 ("GET", "/v1/studies/1.2.3", {}), ("GET", "/v1/studies/1.2.3/sr", {}),
                                 ("GET", "/v2/models/cxr_nodule", {}), ("GET", "/v1/router/batches", {})):
        answer = gateway.request(method, path, **kwargs)
        assert answer.status_code == 401, (path, answer.text)
        assert answer.headers["www-authenticate"].startswith("Bearer")
        wrong = gateway.request(method, path, **{**kwargs, "headers": {**kwargs.get("headers", {}),
                                                                        "Authorization": "Bearer nope"}})
        assert wrong.status_code == 401
    for path in ("/healthz", "/readyz", "/openapi.json", "/v2/health/live"):
        assert gateway.get(path).status_code == 200, path


def test_async_study_gives_results_sr_and_sc_to_its_tenant_only(gateway):
    body = chest(2)
    study_uid = str(pydicom.dcmread(io.BytesIO(body)).StudyInstanceUID)
    accepted = gateway.post("/v1/studies", content=body, headers={**ASYNC, **MOSCOW})
    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["location"] == f"/v1/studies/{study_uid}"
    status = wait_done(gateway, study_uid)
    assert status["status"] == "done", status
    tools = {tool["tool"]: tool for tool in status["results"]["results"][0]["tools"]}
    assert tools["cxr_nodule"]["findings"], "the drawn nodule is found"

    sr_answer = gateway.get(f"/v1/studies/{study_uid}/sr", headers=MOSCOW)
    assert sr_answer.status_code == 200 and sr_answer.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(io.BytesIO(sr_answer.content))
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)  # highdicom's own validation
    assert report.StudyInstanceUID == study_uid and sr.SOPInstanceUID != study_uid
    assert any("AI result, not a diagnosis" in text for text in sr_texts(sr))
    sc_answer = gateway.get(f"/v1/studies/{study_uid}/sc", headers=MOSCOW)
    assert sc_answer.status_code == 200
    captures = [pydicom.dcmread(io.BytesIO(part)) for _, part in
                multipart_parts(sc_answer.content, sc_answer.headers["content-type"])]
    assert captures and all(c.StudyInstanceUID == study_uid for c in captures)

    # The other tenant: the same answer as for a study that does not exist.
    for path in (f"/v1/studies/{study_uid}", f"/v1/studies/{study_uid}/sr", f"/v1/studies/{study_uid}/sc",
                 "/v1/studies/1.2.826.0.1.3680043.8.498.1"):
        answer = gateway.get(path, headers=TATARSTAN)
        assert answer.status_code == 403 and answer.json()["error"] == "forbidden", path


def test_resubmission_and_idempotency_key_do_not_run_tools_twice(gateway):
    body = chest(3)
    study_uid = str(pydicom.dcmread(io.BytesIO(body)).StudyInstanceUID)
    first = gateway.post("/v1/studies", content=body, headers={**ASYNC, **MOSCOW, "Idempotency-Key": "k-3"})
    assert first.status_code == 202
    done = wait_done(gateway, study_uid)
    again = gateway.post("/v1/studies", content=body, headers={**ASYNC, **MOSCOW})
    assert again.status_code == 202 and again.json()["job_id"] == first.json()["job_id"]
    assert again.json()["status"] == "done"
    other_body = chest(4)  # different instances, same key: the key's first study
    keyed = gateway.post("/v1/studies", content=other_body, headers={**ASYNC, **MOSCOW, "Idempotency-Key": "k-3"})
    assert keyed.json()["job_id"] == first.json()["job_id"]
    assert wait_done(gateway, study_uid) == done


def test_grpc_oip_and_study_service(platform, gateway):
    client = triton_grpc.InferenceServerClient(platform["grpc"])
    metadata = MOSCOW["Authorization"]
    headers = {"authorization": metadata}
    assert client.is_server_live()
    assert client.is_model_ready("cxr_nodule", headers=headers)
    phantom = make_phantom((SEED, 5), shape=(512, 420), findings=["cxr_nodule"])
    inputs = []
    for name, array, dtype in (("pixels", phantom.stored[None], "UINT16"),
                               ("params", phantom.params.as_vector()[None], "FP32"),
                               ("voi_lut", np.zeros((1, 1), np.float32), "FP32")):
        tensor = triton_grpc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("cxr_nodule", inputs, headers=headers)
    assert 0.5 <= float(result.as_numpy("probability")[0, 0]) <= 1.0
    with pytest.raises(Exception, match="unknown model"):
        client.get_model_metadata("cxr_nodule_net", headers=headers)
    with pytest.raises(Exception, match="UNAUTHENTICATED|bearer"):
        client.infer("cxr_nodule", inputs)
    with pytest.raises(Exception, match="not offered"):
        client.unload_model("cxr_nodule", headers=headers)

    with grpc.insecure_channel(platform["grpc"]) as channel:
        studies = studies_pb2_grpc.StudiesStub(channel)
        body = dicom_bytes(phantom)
        answer = studies.Submit(studies_pb2.SubmitRequest(instances=[body]), metadata=[("authorization", metadata)])
        tools = {tool.tool: tool for tool in answer.results[0].tools}
        assert tools["cxr_nodule"].findings and tools["cxr_nodule"].findings[0].probability >= 0.5
        with pytest.raises(grpc.RpcError) as refused:
            studies.Submit(studies_pb2.SubmitRequest(instances=[b"not dicom"]), metadata=[("authorization", metadata)])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not_dicom" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            studies.Submit(studies_pb2.SubmitRequest(instances=[body]))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _router_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if b"ServeReplica:mosmedai:Router" in handle.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _submit_batch(gateway, first_index: int, count: int) -> list[str]:
    bodies = [chest(first_index + i, findings=()) for i in range(count)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: gateway.post("/v1/studies", content=b, headers={**ASYNC, **MOSCOW}), bodies))
    assert [a.status_code for a in answers] == [202] * count, [a.text for a in answers if a.status_code != 202]
    return [answer.headers["location"].rsplit("/", 1)[1] for answer in answers]


def _exactly_one_result(platform_settings, study_uids: list[str], gateway) -> None:
    store = ObjectStore.local(platform_settings.s3_endpoint)
    for uid in study_uids:
        status = wait_done(gateway, uid, timeout_s=300)
        assert status["status"] == "done", status
        commits = [k for k in store.list(platform_settings.results_bucket, f"results/demo-moscow/{status['job_id']}/")
                   if k.endswith("/result.json")]
        assert len(commits) == 1, (uid, commits)


def test_accepted_studies_survive_a_router_crash(platform, platform_settings, gateway):
    uids = _submit_batch(gateway, 100, 8)
    pids = _router_pids()
    assert pids, "no router replica process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    _exactly_one_result(platform_settings, uids, gateway)


def test_accepted_studies_survive_triton_dying_and_coming_back(platform, platform_settings, gateway):
    uids = _submit_batch(gateway, 200, 8)
    local._stop(platform_settings, "triton", grace_s=1.0)
    time.sleep(3.0)
    local.up(platform_settings)  # starts what is not running: Triton
    _exactly_one_result(platform_settings, uids, gateway)


def test_dimse_store_gives_sr_and_sc_back_to_the_tenants_scp(platform, platform_settings):
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

    # The test tenant's result destination (tests/conftest.py): our SCP below.
    (tenant,) = json.loads(platform_settings.tenants_file)
    scp_port = tenant["dimse"]["result_destination"]["port"]

    received = []
    scp = AE(ae_title="TEST_SCP")
    scp.add_supported_context("1.2.840.10008.5.1.4.1.1.88.34")  # Comprehensive 3D SR
    scp.add_supported_context("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture
    scp.add_supported_context("1.2.840.10008.5.1.4.1.1.88.33")  # Comprehensive SR

    def on_store(event):
        received.append(event.dataset)
        return 0x0000

    server = scp.start_server(("127.0.0.1", scp_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        dataset = to_dataset(make_phantom((SEED, 300), findings=["cxr_nodule"]))  # full size, 2500 x 2048
        host, port = platform["dimse"].split(":")
        scu = AE(ae_title="TEST_SCU")
        scu.add_requested_context(DigitalXRayImageStorageForPresentation)
        scu.add_requested_context(Verification)
        association = scu.associate(host, int(port), ae_title="MOSMEDAI_TEST")
        assert association.is_established
        assert association.send_c_echo().Status == 0x0000
        assert association.send_c_store(dataset).Status == 0x0000
        association.release()

        refused = AE(ae_title="STRANGER")
        refused.add_requested_context(Verification)
        rejected = refused.associate(host, int(port), ae_title="MOSMEDAI_TEST")
        assert rejected.is_rejected

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(d.Modality == "SR" for d in received):
            time.sleep(0.5)
        modalities = sorted(d.Modality for d in received)
        assert "SR" in modalities and len(received) >= 2, modalities
        sr = next(d for d in received if d.Modality == "SR")
        assert sr.StudyInstanceUID == dataset.StudyInstanceUID and sr.PatientID == dataset.PatientID
    finally:
        server.shutdown()
