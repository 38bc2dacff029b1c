"""The whole serving path on loopback: gateway -> Ray Serve router -> Triton ensembles.

Real processes, real DICOM bytes; nothing of ours is mocked.
"""

import concurrent.futures
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from pydicom.uid import (
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from mosmedai.local import processes as local
from mosmedai.ingress.tenants import auth_headers
from mosmedai.phantoms.dicom_build import build_dataset, to_bytes
from mosmedai.phantoms.chest_xray import dicom_bytes, make_phantom, to_dataset

CHEST_TOOLS = ["cxr_opacity", "cxr_nodule", "cxr_pneumothorax"]
# Phantom seeds of these tests: apart from the training, calibration and held-out seeds.
TEST_SEED = 7_000_001
DICOM = {"Content-Type": "application/dicom"}


@pytest.fixture(scope="module")
def gateway(platform):
    with httpx.Client(base_url=platform["gateway"], timeout=120.0, headers=auth_headers()) as client:
        yield client


def submit(gateway, body: bytes, **params) -> httpx.Response:
    return gateway.post("/v1/studies", content=body, headers=DICOM, params=params)


def overlaps(found: dict, truth: tuple) -> bool:
    row0, col0, row1, col1 = truth
    centre_r, centre_c = (found["row0"] + found["row1"]) / 2, (found["col0"] + found["col1"]) / 2
    margin_r, margin_c = (row1 - row0) * 0.5, (col1 - col0) * 0.5
    return row0 - margin_r <= centre_r <= row1 + margin_r and col0 - margin_c <= centre_c <= col1 + margin_c


def test_health_and_readiness(gateway, platform_settings):
    assert gateway.get("/healthz").json() == {"status": "alive"}
    ready = gateway.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["states"] == {"triton": True, "pools": {"RU-MOW": True, "RU-TA": True},
                                      **{tool: True for tool in platform_settings.enabled_tools}}


@pytest.mark.parametrize("tool", CHEST_TOOLS)
def test_a_drawn_finding_is_found_and_located(gateway, tool):
    # Full-size radiograph (2500 x 2048), seeds the networks never saw in training.
    phantom = make_phantom((TEST_SEED, 100 + CHEST_TOOLS.index(tool)), shape=(2500, 2048), findings=[tool])
    answer = submit(gateway, dicom_bytes(phantom))
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["modality"] == "DX"
    assert [entry["tool"] for entry in result["tools"]] == CHEST_TOOLS
    entry = next(entry for entry in result["tools"] if entry["tool"] == tool)
    assert entry["model_version"] == "1"
    assert entry["findings"], f"{tool} missed the drawn finding: {entry}"
    assert overlaps(entry["findings"][0]["location"], phantom.boxes[tool])
    assert set(result["timings_ms"]) >= {"decode", "inference", "total"}


def test_a_clean_radiograph_gives_no_findings(gateway):
    phantom = make_phantom((TEST_SEED, 1), shape=(2200, 1800), findings=[])
    result = submit(gateway, dicom_bytes(phantom)).json()
    assert all(not entry["findings"] for entry in result["tools"]), result


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_compressed_and_big_endian_images_give_the_same_answer(gateway, syntax):
    phantom = make_phantom((TEST_SEED, 2), shape=(900, 760), findings=["cxr_opacity"])
    dataset = to_dataset(phantom)
    reference = submit(gateway, to_bytes(dataset)).json()
    answer = submit(gateway, to_bytes(dataset, syntax))
    assert answer.status_code == 200, answer.text
    for expected, got in zip(reference["tools"], answer.json()["tools"]):
        assert got["scores"]["probability"] == pytest.approx(expected["scores"]["probability"], abs=1e-5)


def test_monochrome1_is_read_like_monochrome2(gateway):
    normal = make_phantom((TEST_SEED, 3), shape=(1000, 820), findings=["cxr_nodule"], monochrome1=False)
    inverted = make_phantom((TEST_SEED, 3), shape=(1000, 820), findings=["cxr_nodule"], monochrome1=True)
    a = submit(gateway, dicom_bytes(normal)).json()
    b = submit(gateway, dicom_bytes(inverted)).json()
    assert a["tools"][1]["findings"] and b["tools"][1]["findings"]


def _not_chest():
    rows, cols = np.mgrid[0:256, 0:256]
    return ((rows + cols) % 4096).astype(np.uint16)


def _without_pixel_data() -> bytes:
    dataset = build_dataset(_not_chest(), BodyPartExamined="CHEST")
    del dataset.PixelData
    return to_bytes(dataset)


BAD_REQUESTS = {
    "empty body": (b"", DICOM, 400, "empty_body"),
    "wrong content type": (b"{}", {"Content-Type": "application/json"}, 415, "unsupported_media_type"),
    "no content type": (b"abc", {}, 415, "unsupported_media_type"),
    "not dicom": (b"GIF89a" + bytes(300), DICOM, 422, "not_dicom"),
    "no pixel data": (_without_pixel_data(), DICOM, 422, "no_pixel_data"),
    "ultrasound": (to_bytes(build_dataset(_not_chest(), modality="US", BodyPartExamined="CHEST")), DICOM, 422,
                   "no_tool_accepts"),
    "mr": (to_bytes(build_dataset(_not_chest(), modality="MR")), DICOM, 422, "no_tool_accepts"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_input_gets_a_named_4xx_and_serving_goes_on(gateway, name):
    body, headers, status, code = BAD_REQUESTS[name]
    answer = gateway.post("/v1/studies", content=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == code and answer.json()["detail"]
    good = make_phantom((TEST_SEED, 4), shape=(600, 500))
    assert submit(gateway, dicom_bytes(good)).status_code == 200


def test_truncated_and_undecodable_files_get_422(gateway):
    body = dicom_bytes(make_phantom((TEST_SEED, 5), shape=(800, 700)))
    answer = submit(gateway, body[: len(body) - 1000])
    assert answer.status_code == 422 and "pixel" in answer.json()["detail"].lower()
    no_tool = submit(gateway, to_bytes(build_dataset(_not_chest(), modality="US")))
    assert no_tool.json()["looked_at"]["Modality"] == "US"


def test_tools_query_restricts_the_run_and_unknown_tools_are_named(gateway):
    body = dicom_bytes(make_phantom((TEST_SEED, 6), shape=(600, 500)))
    answer = submit(gateway, body, tools="cxr_nodule")
    assert [entry["tool"] for entry in answer.json()["tools"]] == ["cxr_nodule"]
    unknown = submit(gateway, body, tools="ct_brain_bleed")
    assert unknown.status_code == 422 and "ct_brain_bleed" in unknown.json()["detail"]


def test_stock_tritonclient_http_works_against_the_gateway(platform):
    host = platform["gateway"].removeprefix("http://")
    client = triton_http.InferenceServerClient(host)
    assert client.is_server_ready()
    auth = auth_headers()
    assert client.is_model_ready("cxr_nodule", headers=auth)
    metadata = client.get_model_metadata("cxr_nodule", headers=auth)
    assert {tensor["name"] for tensor in metadata["inputs"]} == {"pixels", "params", "voi_lut"}
    phantom = make_phantom((TEST_SEED, 7), shape=(512, 420), findings=["cxr_nodule"])
    inputs = []
    for name, array, dtype in (("pixels", phantom.stored[None], "UINT16"),
                               ("params", phantom.params.as_vector()[None], "FP32"),
                               ("voi_lut", np.zeros((1, 1), np.float32), "FP32")):
        tensor = triton_http.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    result = client.infer("cxr_nodule", inputs, outputs=[triton_http.InferRequestedOutput("probability", binary_data=True)],
                          headers=auth)
    assert 0.5 <= float(result.as_numpy("probability")[0, 0]) <= 1.0
    with pytest.raises(Exception, match="unknown model"):
        client.get_model_metadata("cxr_nodule_net", headers=auth)  # only tools, not their steps


def test_a_tool_failing_in_its_pool_fails_over_then_503_naming_it_and_recovers(platform, gateway):
    moscow = triton_grpc.InferenceServerClient(platform["triton_grpc"])
    tatarstan = triton_grpc.InferenceServerClient(platform["triton_grpc_RU-TA"])
    body = dicom_bytes(make_phantom((TEST_SEED, 8), shape=(600, 500)))
    moscow.unload_model("cxr_nodule_net")
    try:
        # The home pool (RU-MOW, the demo-moscow tenant's) cannot run the tool: its neighbour does.
        answer = submit(gateway, body)
        assert answer.status_code == 200, answer.text
        routes = {tool["tool"]: (tool["pool"], tool["route"]) for tool in answer.json()["tools"]}
        assert routes["cxr_nodule"] == ("RU-TA", "failover")
        assert routes["cxr_opacity"] == ("RU-MOW", "home")
        # A missing model is the tool's failure, not the pool's: RU-MOW stays in rotation.
        states = {pool["name"]: pool["state"] for pool in gateway.get("/v1/pools").json()["pools"]}
        assert states["RU-MOW"] == "up"
        # No pool can run it: 503 naming the tool, with Retry-After.
        tatarstan.unload_model("cxr_nodule_net")
        answer = submit(gateway, body)
        assert answer.status_code == 503, answer.text
        assert "cxr_nodule" in answer.json()["detail"] and answer.headers["retry-after"].isdigit()
        assert "Traceback" not in answer.text
        assert gateway.get("/readyz").status_code == 503
    finally:
        moscow.load_model("cxr_nodule")
        tatarstan.load_model("cxr_nodule")
    assert submit(gateway, body).status_code == 200


def test_an_idle_router_sends_at_once_and_a_busy_one_batches(platform, gateway, platform_settings):
    body = dicom_bytes(make_phantom((TEST_SEED, 9), shape=(700, 600)))
    submit(gateway, body, tools="cxr_opacity")  # warm
    # Idle: the configured wait (400 ms) must not apply.
    started = time.perf_counter()
    assert submit(gateway, body, tools="cxr_opacity").status_code == 200
    assert (time.perf_counter() - started) * 1000 < platform_settings.router_batch_wait_ms
    # Busy: 24 images, 12 at a time, form batches larger than one. The admission gate may ask
    # some to come back (503 + Retry-After: it judges by the throughput it measured last, and a
    # slow machine after the overload test measures little); a client that waits as told is
    # answered, and a refused study never reached the router.
    gateway.post("/v1/router/batches/reset")

    def answered(_) -> int:
        for _ in range(10):
            answer = submit(gateway, body, tools="cxr_opacity")
            if answer.status_code != 503 or "retry-after" not in answer.headers:
                return answer.status_code
            time.sleep(float(answer.headers["retry-after"]))
        return answer.status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(answered, range(24)))
    assert codes == [200] * 24
    stats = gateway.get("/v1/router/batches").json()["cxr_opacity"]
    assert stats["images"] == 24 and stats["mean_batch_size"] > 1.0


def test_cli_submit_prints_a_table(platform, platform_settings, tmp_path):
    path = tmp_path / "chest.dcm"
    path.write_bytes(dicom_bytes(make_phantom((TEST_SEED, 10), shape=(800, 700), findings=["cxr_nodule"])))
    run = subprocess.run([sys.executable, "-m", "mosmedai.local.cli", "submit", str(path), "--url", platform["gateway"]],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "cxr_nodule" in run.stdout and "focal lung nodule" in run.stdout
    missing = subprocess.run([sys.executable, "-m", "mosmedai.local.cli", "submit", str(tmp_path / "none.dcm"),
                              "--url", platform["gateway"]], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_up_again_does_not_start_a_second_copy(platform, platform_settings):
    before = local.status(platform_settings)
    assert local.up(platform_settings) == platform
    assert local.status(platform_settings) == before


def test_down_stops_everything_and_up_starts_again(platform, platform_settings, gateway):
    pids = [pid for pid in local.status(platform_settings).values() if pid]
    # Clients close first, as they would: connections the server side closes leave the
    # gateway port in TIME_WAIT, and `up` would wait for that to pass.
    gateway.close()
    local.down(platform_settings)
    assert all(pid is None for pid in local.status(platform_settings).values())
    for pid in pids:  # whole sessions gone: Triton's stubs, Ray's raylet and workers
        assert not any(Path(f"/proc/{p}").exists() for p in local._session_members(pid))
    assert local.up(platform_settings)["gateway"] == platform["gateway"]
    body = dicom_bytes(make_phantom((TEST_SEED, 11), shape=(600, 500)))
    with httpx.Client(base_url=platform["gateway"], timeout=120.0, headers=auth_headers()) as client:
        assert submit(client, body).status_code == 200
