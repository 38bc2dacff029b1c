"""The Triton model repository: rendered configs, ensemble wiring, ONNX signatures, and
tool versions side by side (version folders, version_policy, one ensemble per version, a
model card and held-out evaluation per version)."""

import hashlib
import json
from pathlib import Path

import onnxruntime
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from mosmedai.config import REPO_ROOT
from mosmedai.serving.model_repo import rendered_files
from mosmedai.catalog.tools import CATALOG
from mosmedai.phantoms import HELD_OUT_SEED

REPOSITORY = REPO_ROOT / "model_repository"
ONNX_TYPES = {"TYPE_FP32": "tensor(float)"}
TOOL_VERSIONS = sorted((tool, version) for tool, spec in CATALOG.items() for version in spec.versions)


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_committed_files_are_what_the_catalog_renders():
    for relative, content in rendered_files().items():
        path = REPOSITORY / relative
        assert path.exists(), f"{relative} missing: run `make model-configs`"
        assert path.read_text() == content, f"{relative} differs from the catalog: run `make model-configs`"


def test_every_config_parses_and_names_its_folder():
    configs = sorted(REPOSITORY.glob("*/config.pbtxt"))
    shared = {spec.preprocess_model for spec in CATALOG.values()}
    # shared preprocess models, a network and a postprocess model a tool, an ensemble a tool version
    assert len(configs) == len(shared) + 2 * len(CATALOG) + len(TOOL_VERSIONS)
    versioned = {model: spec.versions for spec in CATALOG.values()
                 for model in (spec.network_model, spec.postprocess_model)}
    for path in configs:
        config = parse(path)
        assert config.name == path.parent.name
        folders = sorted(int(child.name) for child in path.parent.iterdir() if child.is_dir())
        # a tool's network and postprocess hold one version folder per tool version, and a
        # policy loading all of them (Triton's default would load only the latest);
        # preprocess models and ensembles have version 1 only
        assert folders == list(versioned.get(config.name, (1,))), f"{path.parent.name}: version folders {folders}"
        if config.name in versioned:
            assert list(config.version_policy.specific.versions) == folders, f"{config.name}: version_policy"
        else:
            assert not config.HasField("version_policy"), config.name


def test_each_tool_version_has_its_own_ensemble_pinning_its_steps():
    for tool, version in TOOL_VERSIONS:
        spec = CATALOG[tool]
        name = spec.ensemble(version)
        assert name == (tool if version == 1 else f"{tool}_v{version}")
        ensemble = parse(REPOSITORY / name / "config.pbtxt")
        assert ensemble.name == name and ensemble.platform == "ensemble"
        pinned = {step.model_name: step.model_version for step in ensemble.ensemble_scheduling.step}
        assert pinned == {spec.preprocess_model: -1, spec.network_model: version, spec.postprocess_model: version}
    assert CATALOG["cxr_opacity"].versions == (1, 2), "cxr_opacity keeps a real second version"
    with pytest.raises(ValueError, match="cxr_nodule has no version 2"):
        CATALOG["cxr_nodule"].ensemble(2)


@pytest.mark.parametrize("tool,version", TOOL_VERSIONS)
def test_each_version_has_a_model_card_and_a_held_out_evaluation_of_its_own_weights(tool, version):
    spec = CATALOG[tool]
    folder = REPOSITORY / spec.ensemble(version)
    card = (folder / "MODEL_CARD.md").read_text()
    assert card.startswith(f"# Model card: `{tool}`" + ("" if version == 1 else f" version {version}"))
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert evaluation["tool"] == tool and evaluation.get("version", 1) == version
    assert evaluation["split"] == "held-out" and evaluation["seed"] == HELD_OUT_SEED and evaluation["n"] > 0
    # the metrics are of this version's network: its path and its bytes
    assert evaluation["model"] == f"{spec.network_model}/{version}/model.onnx"
    weights = (REPOSITORY / evaluation["model"]).read_bytes()
    assert evaluation["model_sha256"] == hashlib.sha256(weights).hexdigest(), f"{folder.name}: evaluation is stale"
    calibration = json.loads((REPOSITORY / spec.postprocess_model / str(version) / "calibration.json").read_text())
    if "model_sha256" in calibration:
        assert calibration["model_sha256"] == evaluation["model_sha256"], f"{folder.name}: calibration is stale"


@pytest.mark.parametrize("tool,version", TOOL_VERSIONS)
def test_ensemble_steps_line_up(tool, version):
    ensemble = parse(REPOSITORY / CATALOG[tool].ensemble(version) / "config.pbtxt")
    assert ensemble.platform == "ensemble"
    available = {tensor.name: tensor for tensor in ensemble.input}  # tensors produced so far
    for step in ensemble.ensemble_scheduling.step:
        model = parse(REPOSITORY / step.model_name / "config.pbtxt")
        assert model.max_batch_size >= ensemble.max_batch_size, step.model_name
        model_inputs = {tensor.name: tensor for tensor in model.input}
        assert set(step.input_map) == set(model_inputs), f"{step.model_name}: every input mapped"
        for model_input, ensemble_tensor in step.input_map.items():
            assert ensemble_tensor in available, f"{step.model_name}.{model_input} <- {ensemble_tensor} not produced yet"
            source = available[ensemble_tensor]
            assert source.data_type == model_inputs[model_input].data_type
            assert list(source.dims) == list(model_inputs[model_input].dims), (step.model_name, model_input)
        model_outputs = {tensor.name: tensor for tensor in model.output}
        for model_output, ensemble_tensor in step.output_map.items():
            available[ensemble_tensor] = model_outputs[model_output]
    for output in ensemble.output:
        assert output.name in available and available[output.name].data_type == output.data_type


@pytest.mark.parametrize("tool,version", TOOL_VERSIONS)
def test_network_onnx_matches_its_config(tool, version):
    spec = CATALOG[tool]
    config = parse(REPOSITORY / spec.network_model / "config.pbtxt")
    path = REPOSITORY / spec.network_model / str(version) / "model.onnx"
    assert path.stat().st_size < 2 * 2**20, "keep the repository lean: ONNX under 2 MB"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for tensors, declared in ((session.get_inputs(), config.input), (session.get_outputs(), config.output)):
        signature = {tensor.name: tensor for tensor in tensors}
        assert set(signature) == {tensor.name for tensor in declared}
        for tensor in declared:
            onnx_tensor = signature[tensor.name]
            assert onnx_tensor.type == ONNX_TYPES[model_config_pb2.DataType.Name(tensor.data_type)]
            dims = [d if isinstance(d, int) else -1 for d in onnx_tensor.shape]
            assert dims[0] == -1, f"{tool}: {tensor.name} needs a dynamic batch axis for Triton's batcher"
            assert dims[1:] == list(tensor.dims), f"{tool}: {tensor.name} {dims} vs config {list(tensor.dims)}"
    assert (REPOSITORY / spec.postprocess_model / str(version) / "calibration.json").exists()
    assert (REPOSITORY / spec.ensemble(version) / "MODEL_CARD.md").exists()


def test_urgent_steps_get_triton_before_routine_and_screening_ones():
    """Every instance takes a rate-limiter slot; its priority follows its tools' class, and a
    step shared across classes runs at the most urgent one."""
    from mosmedai.serving.model_repo import RATE_LIMIT_PRIORITY, RATE_LIMIT_RESOURCE
    from mosmedai.serving.routing import ROUTINE, SCREENING, URGENT, priority_of

    def priority(model: str) -> int:
        (group,) = parse(REPOSITORY / model / "config.pbtxt").instance_group
        assert [(r.name, r.count) for r in group.rate_limiter.resources] == [(RATE_LIMIT_RESOURCE, 1)]
        return group.rate_limiter.priority

    for spec in CATALOG.values():
        assert priority(spec.network_model) == priority(spec.postprocess_model) == RATE_LIMIT_PRIORITY[priority_of(spec)]
    assert priority(CATALOG["ctb_hemorrhage"].preprocess_model) == RATE_LIMIT_PRIORITY[URGENT] == 1
    assert priority(CATALOG["flg_triage"].network_model) == RATE_LIMIT_PRIORITY[SCREENING] > RATE_LIMIT_PRIORITY[ROUTINE]
    # xr_preprocess serves chest X-ray (routine) and fluorography and mammography (screening)
    assert CATALOG["mg_mass"].preprocess_model == CATALOG["cxr_opacity"].preprocess_model
    assert priority(CATALOG["mg_mass"].preprocess_model) == RATE_LIMIT_PRIORITY[ROUTINE]
