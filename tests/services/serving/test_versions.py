"""Tool versions side by side: configuration refused at start for an unknown tool or version,
Triton loading the chosen version's ensemble, and a study run with cxr_opacity version 2
reporting version 2 in JSON, gRPC and the SR (TID 4019 Algorithm Version).

The study test starts a Triton of its own (``local.triton_command`` with MOSMEDAI settings
choosing version 2, plus version 1's ensemble beside it) and calls it through the real
Router class and the worker's analysis path; nothing of ours is mocked."""

import asyncio
import io
import json
import os
import socket
import subprocess
import time

import highdicom as hd
import httpx
import pydicom
import pytest
from google.protobuf import json_format
from pydantic import ValidationError

from mosmedai.local import processes as local
from mosmedai.config import Settings
from mosmedai.ingress.grpc_api import studies_pb2
from mosmedai.serving.router import Router, StudyContext
from mosmedai.phantoms.chest_xray import dicom_bytes, make_phantom
from mosmedai.studies.runner import analyse
from mosmedai.results.dicom_objects import study_objects as result_objects

PORT_OFFSET = int(os.environ.get("MOSMEDAI_TEST_PORT_OFFSET", "0"))
BASE_PORT = 28200 + PORT_OFFSET


@pytest.mark.parametrize("versions,named", [
    ({"cxr_opacty": 2}, "unknown tool 'cxr_opacty'"),
    ({"cxr_opacity": 3}, "tool cxr_opacity has no version 3; its versions: [1, 2]"),
    ({"cxr_nodule": 2}, "tool cxr_nodule has no version 2; its versions: [1]"),
])
def test_an_unknown_tool_or_version_is_refused_at_start_naming_it(versions, named, monkeypatch):
    with pytest.raises(ValidationError, match="tool_versions") as refused:
        Settings(tool_versions=versions)
    assert named in str(refused.value)
    # the same from the environment, as a deployment sets it
    monkeypatch.setenv("MOSMEDAI_TOOL_VERSIONS", json.dumps(versions))
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert named in str(refused.value)


def test_a_version_missing_from_the_model_repository_is_refused_naming_it(tmp_path):
    (tmp_path / "cxr_opacity").mkdir()
    with pytest.raises(ValidationError, match=r"not in the model repository .*cxr_opacity version 2 \(cxr_opacity_v2\)"):
        Settings(model_repository=tmp_path, tool_versions={"cxr_opacity": 2})


def test_default_keeps_version_1_and_triton_loads_the_chosen_ensembles(tmp_path):
    default = Settings(run_dir=tmp_path)
    assert default.tool_versions == {} and default.tool_version("cxr_opacity") == 1
    assert default.ensemble_of("cxr_opacity") == "cxr_opacity"
    command, _ = local.triton_command(default)
    assert "--load-model=cxr_opacity" in command and not any("_v2" in arg for arg in command)

    chosen = Settings(run_dir=tmp_path, tool_versions={"cxr_opacity": 2})
    assert chosen.as_env()["MOSMEDAI_TOOL_VERSIONS"] == '{"cxr_opacity": 2}'
    command, _ = local.triton_command(chosen)
    assert "--load-model=cxr_opacity_v2" in command and "--load-model=cxr_opacity" not in command
    assert "--load-model=cxr_nodule" in command  # tools not named run version 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def versions_pool(tmp_path_factory):
    """A Triton of this test's own: cxr_opacity at version 2 (chosen), and version 1's ensemble
    beside it. Yields the settings a router uses to reach it."""
    settings = Settings(run_dir=tmp_path_factory.mktemp("versions"), enabled_tools=["cxr_opacity"],
                        second_pool_tools=[], tool_versions={"cxr_opacity": 2},
                        triton_http_port=BASE_PORT, triton_grpc_port=BASE_PORT + 1, triton_metrics_port=BASE_PORT + 2,
                        router_metrics_port=free_port(), triton_execution_slots=2)
    command, env = local.triton_command(settings)
    assert "--load-model=cxr_opacity_v2" in command
    command.append("--load-model=cxr_opacity")  # version 1 side by side, for a per-call choice
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.log_dir / "triton-versions.log"
    process = subprocess.Popen(command, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"http://{settings.bind_host}:{BASE_PORT}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the versions Triton did not become ready"
            time.sleep(0.5)
        pools = [{"name": "RU-MOW", "regions": ["RU-MOW"], "endpoints": [settings.triton_grpc_target]}]
        yield settings.model_copy(update={"pools_file": json.dumps(pools)})
    finally:
        os.killpg(process.pid, 9)
        process.wait()


def test_a_study_run_with_version_2_names_version_2_in_json_grpc_and_the_sr(versions_pool):
    settings = versions_pool
    # both versions of the network and postprocess are loaded side by side (version_policy)
    for model in ("cxr_opacity_net", "cxr_opacity_post"):
        for version in ("1", "2"):
            ready = httpx.get(f"http://{settings.bind_host}:{BASE_PORT}/v2/models/{model}/versions/{version}/ready")
            assert ready.status_code == 200, (model, version)
    body = dicom_bytes(make_phantom((31, 7), findings=["cxr_opacity"]))

    async def run():
        router = Router.func_or_class(settings.model_dump(mode="json"))
        context = StudyContext("t", "RU-MOW", 60.0)

        async def infer(tools, tensors):
            return await router.infer_image(tools, tensors, context)

        results, items = await analyse(settings, infer, [body], ["cxr_opacity"])
        # the same image at version 1, chosen for this call (version 1's ensemble is loaded too)
        first = await router.infer_image(["cxr_opacity"], items[0].tensors, context, versions={"cxr_opacity": 1})
        with pytest.raises(ValueError, match="cxr_opacity version 5"):
            await router.infer_image(["cxr_opacity"], items[0].tensors, context, versions={"cxr_opacity": 5})
        return results, items, first["cxr_opacity"]

    results, items, first = asyncio.run(run())
    # JSON (what POST /v1/studies answers)
    document = json.loads(results.model_dump_json())
    (tool,) = document["results"][0]["tools"]
    assert tool["tool"] == "cxr_opacity" and tool["model_version"] == "2", tool
    # version 1 answered for the same image with its own network: another probability
    assert first["model_version"] == "1"
    assert abs(first["probability"] - tool["scores"]["probability"]) > 1e-6, (first, tool)
    # gRPC: the study service's answer is made from that JSON (grpc_server.Submit)
    message = json_format.ParseDict(document, studies_pb2.StudyResults(), ignore_unknown_fields=True)
    assert message.results[0].tools[0].model_version == "2"
    # the SR: TID 4019 Algorithm Identification names the tool and version 2
    sr = pydicom.dcmread(io.BytesIO(result_objects([body], items, results)["sr.dcm"]))
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    groups = report.get_planar_roi_measurement_groups() + report.get_image_measurement_groups()
    algorithms = set()
    for group in groups:  # as tests/services/results/test_results_dicom.py reads them
        values = {item.ConceptNameCodeSequence[0].CodeValue: str(item.TextValue)
                  for item in group[0].ContentSequence if item.ValueType == "TEXT"}
        algorithms.add((values["111001"], values["111003"]))  # Algorithm Name, Algorithm Version
    assert algorithms == {("cxr_opacity", "2")}, algorithms


def test_a_tool_name_that_reads_as_a_version_ensemble_is_refused():
    from mosmedai.catalog.tools import _name_problem

    assert "cxr_opacity_v2" in _name_problem("cxr_opacity_v2")
    assert _name_problem("cxr_opacity") is None and _name_problem("ctb_midline_shift") is None


def test_open_inference_protocol_addresses_tool_versions(platform):
    """The session platform runs the default (version 1): OIP's version path maps a tool
    version to its ensemble; a version the tool does not have is a 404 naming its versions."""
    from mosmedai.ingress.tenants import auth_headers

    with httpx.Client(base_url=platform["gateway"], timeout=60.0, headers=auth_headers()) as client:
        assert client.get("/v2/models/cxr_opacity/ready").status_code == 200
        assert client.get("/v2/models/cxr_opacity/versions/1/ready").status_code == 200
        # version 2 is in the repository but this deployment did not load its ensemble
        assert client.get("/v2/models/cxr_opacity/versions/2/ready").status_code != 200
        missing = client.get("/v2/models/cxr_opacity/versions/3/ready")
        assert missing.status_code == 404 and "versions: [1, 2]" in missing.json()["error"]
        assert client.get("/v2/models/cxr_nodule/versions/2/ready").status_code == 404
        assert client.get("/v2/models/cxr_opacity/versions/²/ready").status_code == 404  # a digit int() refuses
    # the gRPC front door's OIP proxy: the same addressing
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(platform["grpc"])
    headers = {key.lower(): value for key, value in auth_headers().items()}
    assert client.is_model_ready("cxr_opacity", headers=headers)
    assert client.is_model_ready("cxr_opacity", "1", headers=headers)
    assert not client.is_model_ready("cxr_opacity", "2", headers=headers)  # cxr_opacity_v2: not loaded here
    with pytest.raises(Exception, match=r"no version 3; versions: \[1, 2\]"):
        client.is_model_ready("cxr_opacity", "3", headers=headers)
