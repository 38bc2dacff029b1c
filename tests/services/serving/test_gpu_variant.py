"""The gpu variant of the model repository (CI, no GPU): configs, engine cache keys, gpu-check."""

import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from mosmedai.serving import tensorrt_build
from mosmedai.config import REPO_ROOT
from mosmedai.serving.model_repo import MAX_BATCH_SIZE, rendered_files
from mosmedai.serving.tensorrt_build import EngineKey, compare, render_gpu_repository
from mosmedai.catalog.tools import CATALOG

REPOSITORY = REPO_ROOT / "model_repository"


def config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def gpu_files():
    return {path: config(text) for path, text in rendered_files("gpu").items() if path.endswith("config.pbtxt")}


@pytest.fixture(scope="module")
def cpu_files():
    return {path: config(text) for path, text in rendered_files("cpu").items() if path.endswith("config.pbtxt")}


@pytest.mark.parametrize("tool", sorted(CATALOG))
def test_network_step_is_a_tensorrt_plan_matching_the_cpu_variant(tool, gpu_files, cpu_files):
    spec = CATALOG[tool]
    gpu = gpu_files[f"{spec.network_model}/config.pbtxt"]
    cpu = cpu_files[f"{spec.network_model}/config.pbtxt"]
    assert gpu.name == spec.network_model
    assert gpu.platform == "tensorrt_plan" and not gpu.backend
    assert gpu.default_model_filename == "model.plan"
    assert gpu.max_batch_size == MAX_BATCH_SIZE
    assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    for field in ("input", "output"):
        assert [(t.name, t.data_type, list(t.dims)) for t in getattr(gpu, field)] == \
               [(t.name, t.data_type, list(t.dims)) for t in getattr(cpu, field)], field
    # the pre and post steps are the same CPU Python models in both variants, but the gpu
    # variant holds version 1 of each tool only (one engine a tool)
    assert list(gpu.version_policy.specific.versions) == [1]
    for model in (spec.preprocess_model, spec.postprocess_model, spec.name):
        gpu_config, cpu_config = model_config_pb2.ModelConfig(), model_config_pb2.ModelConfig()
        gpu_config.CopyFrom(gpu_files[f"{model}/config.pbtxt"])
        cpu_config.CopyFrom(cpu_files[f"{model}/config.pbtxt"])
        if model == spec.postprocess_model:
            assert list(gpu_config.version_policy.specific.versions) == [1]
            gpu_config.ClearField("version_policy")
            cpu_config.ClearField("version_policy")
        assert gpu_config == cpu_config
    assert not any(path.startswith(f"{tool}_v") for path in rendered_files("gpu", [tool]))
    assert f"{spec.network_model}/1/model.py" not in rendered_files("gpu", [tool])


@pytest.mark.parametrize("tool", sorted(CATALOG))
def test_network_config_matches_the_onnx_file(tool, gpu_files):
    spec = CATALOG[tool]
    path = REPOSITORY / spec.network_model / "1" / "model.onnx"
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO_ROOT)} not trained yet")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gpu = gpu_files[f"{spec.network_model}/config.pbtxt"]
    for onnx_tensors, declared in ((session.get_inputs(), gpu.input), (session.get_outputs(), gpu.output)):
        signature = {t.name: [d if isinstance(d, int) else -1 for d in t.shape] for t in onnx_tensors}
        assert set(signature) == {t.name for t in declared}
        for tensor in declared:
            assert signature[tensor.name][0] == -1, f"{tool}: {tensor.name} needs a dynamic batch axis"
            assert signature[tensor.name][1:] == list(tensor.dims)


@pytest.mark.parametrize("tool", sorted(CATALOG))
def test_gpu_ensemble_lines_up(tool, gpu_files):
    ensemble = gpu_files[f"{tool}/config.pbtxt"]
    available = {t.name: t for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = gpu_files[f"{step.model_name}/config.pbtxt"]
        assert model.max_batch_size >= ensemble.max_batch_size
        inputs = {t.name: t for t in model.input}
        assert set(step.input_map) == set(inputs), step.model_name
        for name, tensor in step.input_map.items():
            assert tensor in available, (step.model_name, tensor)
            assert available[tensor].data_type == inputs[name].data_type
            assert list(available[tensor].dims) == list(inputs[name].dims)
        outputs = {t.name: t for t in model.output}
        for name, tensor in step.output_map.items():
            available[tensor] = outputs[name]
    for output in ensemble.output:
        assert output.name in available and available[output.name].data_type == output.data_type


def test_render_gpu_repository_places_engines_and_no_onnx(tmp_path):
    tools = ["cxr_opacity", "cxr_nodule"]
    engines = {}
    for tool in tools:
        engines[tool] = tmp_path / f"{tool}.plan"
        engines[tool].write_bytes(b"plan of " + tool.encode())
    out = tmp_path / "gpu"
    render_gpu_repository(out, tools, engines)
    for tool in tools:
        spec = CATALOG[tool]
        assert (out / spec.network_model / "1" / "model.plan").read_bytes() == b"plan of " + tool.encode()
        assert (out / spec.postprocess_model / "1" / "calibration.json").exists()
        assert config((out / spec.network_model / "config.pbtxt").read_text()).platform == "tensorrt_plan"
    assert not list(out.rglob("*.onnx"))
    shared = {CATALOG[t].preprocess_model for t in tools}
    assert len(list(out.glob("*/config.pbtxt"))) == len(shared) + 3 * len(tools)
    with pytest.raises(ValueError, match="no engine"):
        render_gpu_repository(tmp_path / "other", tools, {})


def test_engine_cache_key_changes_with_gpu_tensorrt_and_onnx():
    base = EngineKey("cxr_opacity_net", "NVIDIA H100 80GB HBM3", "9.0", "10.13.3.9", "ab" * 32, True)
    path = base.path(Path(".cache/engines"))
    assert path == Path(".cache/engines/nvidia-h100-80gb-hbm3-sm90/trt-10.13.3.9/cxr_opacity_net-abababababab-fp16.plan")
    variants = [
        EngineKey("cxr_opacity_net", "NVIDIA L4", "8.9", "10.13.3.9", "ab" * 32, True),
        EngineKey("cxr_opacity_net", "NVIDIA H100 80GB HBM3", "9.0", "10.12.0.36", "ab" * 32, True),
        EngineKey("cxr_opacity_net", "NVIDIA H100 80GB HBM3", "9.0", "10.13.3.9", "cd" * 32, True),
        EngineKey("cxr_opacity_net", "NVIDIA H100 80GB HBM3", "9.0", "10.13.3.9", "ab" * 32, False),
        EngineKey("cxr_nodule_net", "NVIDIA H100 80GB HBM3", "9.0", "10.13.3.9", "ab" * 32, True),
    ]
    paths = {key.path() for key in variants} | {base.path()}
    assert len(paths) == len(variants) + 1


def test_gpu_info_reads_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA A100-SXM4-80GB, 8.0'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("NVIDIA_SMI", str(smi))
    assert tensorrt_build.gpu_info() == tensorrt_build.GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")


def test_compare_applies_the_tolerance():
    reference = {"logit": np.zeros((2, 1), np.float32), "heatmap": np.zeros((2, 1, 4, 4), np.float32)}
    candidate = {"logit": np.full((2, 1), 0.01, np.float32), "heatmap": np.zeros((2, 1, 4, 4), np.float32)}
    report = compare(reference, candidate, tensorrt_build.TOLERANCE["fp16"])
    assert report["logit"]["passed"] and report["logit"]["max_abs_diff"] == pytest.approx(0.01)
    report = compare(reference, candidate, tensorrt_build.TOLERANCE["fp32"])
    assert not report["logit"]["passed"] and report["heatmap"]["passed"]
    assert not compare(reference, {"logit": np.zeros((3, 1))}, 1.0)["heatmap"]["passed"]


def run_gpu_check(tmp_path, smi: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NVIDIA_SMI": smi}
    return subprocess.run([str(REPO_ROOT / "scripts" / "gpu-check"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=60)


def test_gpu_check_refuses_without_a_gpu(tmp_path):
    answer = run_gpu_check(tmp_path, str(tmp_path / "no-such-nvidia-smi"))
    assert answer.returncode == 2
    assert "no NVIDIA GPU" in answer.stderr and "Nothing was built" in answer.stderr
    assert not (tmp_path / "out" / "gpu-check.json").exists()


def test_gpu_check_refuses_when_the_driver_fails(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\n"
                   "exit 9\n")
    smi.chmod(0o755)
    answer = run_gpu_check(tmp_path, str(smi))
    assert answer.returncode == 2
    assert "no usable NVIDIA GPU" in answer.stderr and "communicate with the NVIDIA driver" in answer.stderr


def test_tensorrt_build_check_exits_2_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("NVIDIA_SMI", str(tmp_path / "none"))
    monkeypatch.setattr(tensorrt_build, "gpu_info", lambda index=0: (_ for _ in ()).throw(tensorrt_build.NoGpu("none")))
    assert tensorrt_build.main(["check"]) == 2
