"""Bring your own model: tool packages are validated, installed and served by their head."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2

from mosmedai.catalog import byo
from mosmedai.config import REPO_ROOT
from mosmedai.catalog.families import IMAGE
from mosmedai.catalog.imaging import GrayscaleParams, VoiFunction, preprocess
from mosmedai.serving.model_repo import install_package, rendered_files
from mosmedai.catalog.tools import BUILTIN_TOOLS, CATALOG

EXAMPLE = REPO_ROOT / "examples" / "byo-tool"


def make_onnx(path: Path, size: int = 64, outputs: dict[str, tuple] | None = None, input_name: str = "image",
              batch: str | int = "batch", channels: int = 1) -> Path:
    """A tiny graph: image -> global mean m [batch, 1]; every output is m tiled to its shape."""
    outputs = outputs or {"score": (1,)}
    nodes = [helper.make_node("ReduceMean", [input_name], ["m4"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Reshape", ["m4", "two"], ["m"])]
    inits = [numpy_helper.from_array(np.array([-1, 1], np.int64), "two")]
    infos = []
    for i, (name, shape) in enumerate(outputs.items()):
        count = int(np.prod(shape))
        inits += [numpy_helper.from_array(np.arange(count, dtype=np.float32).reshape(1, count), f"w{i}"),
                  numpy_helper.from_array(np.array([-1, *shape], np.int64), f"s{i}")]
        nodes += [helper.make_node("Add", ["m", f"w{i}"], [f"flat{i}"]),
                  helper.make_node("Reshape", [f"flat{i}", f"s{i}"], [name])]
        infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *shape]))
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(
        input_name, TensorProto.FLOAT, [batch, channels, size, size])], infos, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


BASE = {
    "name": "wrist_test", "title": "Wrist X-ray: test", "finding": "test finding",
    "modalities": ["DX", "CR"], "body_parts": ["WRIST"], "views": ["PA"],
    "input": {"kind": "image", "size": 64},
    "outputs": {"logit": "score"},
    "head": {"type": "classification", "threshold": 0.4, "calibration": {"a": 2.0, "b": -1.0}},
}


def package(tmp_path: Path, manifest: dict | None = None, **onnx_args) -> Path:
    directory = tmp_path / "pkg"
    directory.mkdir(exist_ok=True)
    (directory / "manifest.yaml").write_text(yaml.safe_dump(manifest or BASE, allow_unicode=True))
    make_onnx(directory / "model.onnx", **onnx_args)
    return directory


def with_(base: dict, path: str, value) -> dict:
    data = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return data


DELETE = object()


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


# --- the example package ----------------------------------------------------------------------
def test_example_package_is_small_and_valid():
    assert (EXAMPLE / "model.onnx").stat().st_size < 100_000
    spec = byo.load_package(EXAMPLE)
    assert spec.name == "demo_bright_spot" and spec.kind == IMAGE
    assert spec.preprocess_model == "demo_bright_spot_preprocess"  # 128 px and mean/std differ from xr_preprocess
    assert [(t.name, t.dims) for t in spec.network_outputs] == [("score", (1,)), ("cam", (1, 16, 16))]
    assert spec.name not in BUILTIN_TOOLS


def test_example_model_is_what_make_model_writes(tmp_path):
    subprocess.run([sys.executable, str(EXAMPLE / "make_model.py"), str(tmp_path / "m.onnx")], check=True,
                   capture_output=True)
    assert (tmp_path / "m.onnx").read_bytes() == (EXAMPLE / "model.onnx").read_bytes()


def test_install_renders_configs_that_parse_and_line_up(tmp_path):
    repository = tmp_path / "repo"
    written = install_package(EXAMPLE, repository)
    assert repository / "demo_bright_spot_net" / "1" / "model.onnx" in written
    calibration = json.loads((repository / "demo_bright_spot_post" / "1" / "calibration.json").read_text())
    assert calibration["head"] == "detection" and calibration["outputs"] == {"logit": "score", "heatmap": "cam"}
    configs = {p.parent.name: parse(p) for p in repository.glob("*/config.pbtxt")}
    assert set(configs) == {"demo_bright_spot", "demo_bright_spot_preprocess", "demo_bright_spot_net",
                            "demo_bright_spot_post"}
    pre = configs["demo_bright_spot_preprocess"]
    assert {k: v.string_value for k, v in pre.parameters.items()} == {
        "network_size": "128", "mean": "0.5", "std": "0.25"}
    ensemble = configs["demo_bright_spot"]
    available = {t.name: t for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        inputs = {t.name: t for t in model.input}
        assert set(step.input_map) == set(inputs)
        for name, tensor in step.input_map.items():
            assert tensor in available
            assert list(available[tensor].dims) == list(inputs[name].dims), (step.model_name, name)
            assert available[tensor].data_type == inputs[name].data_type
        outputs = {t.name: t for t in model.output}
        for name, tensor in step.output_map.items():
            available[tensor] = outputs[name]
    assert {t.name for t in ensemble.output} <= set(available)
    # the network's config matches the copied ONNX
    import onnxruntime

    session = onnxruntime.InferenceSession(str(repository / "demo_bright_spot_net" / "1" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    net = configs["demo_bright_spot_net"]
    assert [i.name for i in session.get_inputs()] == [t.name for t in net.input] == ["image"]
    assert {o.name: o.shape[1:] for o in session.get_outputs()} == {t.name: list(t.dims) for t in net.output}


def test_default_input_shares_xr_preprocess(tmp_path):
    manifest = with_(BASE, "input.size", 256)
    spec = byo.load_package(package(tmp_path, manifest, size=256))
    assert spec.preprocess_model == "xr_preprocess"
    files = rendered_files(specs=[spec])
    assert files["xr_preprocess/config.pbtxt"] == rendered_files(tools=["cxr_opacity"])["xr_preprocess/config.pbtxt"]


def test_extra_onnx_outputs_are_dropped_on_install(tmp_path):
    directory = package(tmp_path, outputs={"score": (1,), "debug": (3,)})
    repository = tmp_path / "repo"
    install_package(directory, repository)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(repository / "wrist_test_net/1/model.onnx"),
                                           providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["score"]


def test_builtin_name_is_refused(tmp_path):
    directory = package(tmp_path, with_(BASE, "name", "cxr_opacity"))
    with pytest.raises(byo.PackageError, match="name: 'cxr_opacity' is a built-in tool"):
        install_package(directory, tmp_path / "repo")


def test_packages_load_into_the_catalog_from_the_environment(tmp_path):
    shutil.copytree(EXAMPLE, tmp_path / "packages" / "demo")
    code = ("from mosmedai.catalog.tools import CATALOG, family_module; s = CATALOG['demo_bright_spot']; "
            "print(family_module(s.name).__name__, s.preprocess_model)")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "services"), "MOSMEDAI_TOOL_PACKAGES": str(tmp_path / "packages")}
    answer = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.split() == ["mosmedai.catalog.byo", "demo_bright_spot_preprocess"]
    # a package named like a built-in tool stops the import with the field named
    clash = tmp_path / "clash"
    shutil.copytree(EXAMPLE, clash)
    text = (clash / "manifest.yaml").read_text().replace("name: demo_bright_spot", "name: cxr_nodule")
    (clash / "manifest.yaml").write_text(text)
    env["MOSMEDAI_TOOL_PACKAGES"] = str(clash)
    answer = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert answer.returncode != 0 and "name: 'cxr_nodule' is a built-in tool" in answer.stderr


def test_model_repo_cli_installs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "services")}
    answer = subprocess.run([sys.executable, "-m", "mosmedai.serving.model_repo", "--repository", str(tmp_path / "r"),
                             "--install-package", str(EXAMPLE)], env=env, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    assert (tmp_path / "r" / "demo_bright_spot_net" / "1" / "model.onnx").exists()


# --- refusals: each names the field -------------------------------------------------------------
REFUSALS = [
    (with_(BASE, "modalities", ["CT"]), {}, r"manifest.yaml: modalities: .*'CT'.* not allowed.*'DX'"),
    (with_(BASE, "outputs", {"logit": "nope"}), {},
     r"manifest.yaml: outputs.logit: 'nope' is not an output of model.onnx \(outputs: score\)"),
    (BASE, {"size": 96}, r"manifest.yaml: input.size: 64 does not match model.onnx input 'image' 96 x 96"),
    (with_(BASE, "head.threshold", 1.5), {}, r"manifest.yaml: head.threshold: 1.5 is not a probability in \[0, 1\]"),
    (with_(BASE, "outputs", {"logit": "score", "heatmap": "score2"}), {"outputs": {"score": (1,), "score2": (1, 4, 4)}},
     r"manifest.yaml: outputs: a classification head reads \{logit\} or \{probability\}"),
    (with_(with_(BASE, "head", {"type": "detection"}), "outputs", {"logit": "score"}), {},
     r"outputs: a detection head reads \{heatmap, logit\}"),
    (BASE, {"outputs": {"score": (3,)}}, r"manifest.yaml: outputs.logit: 'score' must be one number per image"),
    (with_(BASE, "head", {"type": "regression", "measurement": {"name": "age", "unit": "years"}}),
     {}, r"manifest.yaml: head: measurement.unit: 'years' is not a UCUM unit"),
    (with_(with_(BASE, "head", {"type": "category", "measurement": {"name": "grade"}, "labels": ["A", "B", "C"]}),
           "outputs", {"logits": "score"}), {"outputs": {"score": (4,)}},
     r"manifest.yaml: head.labels: 3 labels but model.onnx output 'score' gives 4 logits"),
    (with_(with_(BASE, "head", {"type": "category", "measurement": {"name": "grade"}, "labels": ["A", "A"]}),
           "outputs", {"logits": "score"}), {}, r"manifest.yaml: head: labels: duplicate labels"),
    (with_(BASE, "input.kind", "volume"), {}, r"manifest.yaml: input.kind: volume packages are not supported yet"),
    (with_(BASE, "name", "Bad Name"), {}, r"manifest.yaml: name: String should match pattern"),
    (with_(BASE, "colour", "red"), {}, r"manifest.yaml: colour: Extra inputs are not permitted"),
    (with_(BASE, "title", DELETE), {}, r"manifest.yaml: title: Field required"),
    (with_(BASE, "input.windowing", {"mode": "fixed", "center": 100}), {},
     r"manifest.yaml: input.windowing: mode 'fixed' needs center and width"),
    (BASE, {"input_name": "input.1"}, r"model.onnx: the network must have one input named 'image'"),
    (BASE, {"batch": 1}, r"model.onnx: input 'image' has a fixed batch size 1"),
    (with_(BASE, "outputs", {"logit": "location"}), {"outputs": {"location": (1,)}},
     r"outputs.logit: 'location' is a name the ensemble uses itself"),
]


@pytest.mark.parametrize("manifest, onnx_args, message", REFUSALS,
                         ids=[m for _, _, m in [(0, 0, str(i)) for i in range(len(REFUSALS))]])
def test_wrong_manifest_is_refused_naming_the_field(tmp_path, manifest, onnx_args, message):
    args = {"size": 64, **onnx_args}
    with pytest.raises(byo.PackageError, match=message):
        byo.load_package(package(tmp_path, manifest, **args))


def test_missing_files_and_bad_yaml(tmp_path):
    with pytest.raises(byo.PackageError, match="no manifest.yaml"):
        byo.load_package(tmp_path)
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(BASE))
    with pytest.raises(byo.PackageError, match="model.onnx: missing"):
        byo.load_package(tmp_path)
    (tmp_path / "manifest.yaml").write_text("name: [unclosed")
    with pytest.raises(byo.PackageError, match="manifest.yaml: not valid YAML"):
        byo.load_package(tmp_path)


@pytest.mark.parametrize("unit, ok", [("mm", True), ("deg", True), ("%", True), ("[hnsf'U]", True), ("a", True),
                                      ("mm2", True), ("mg/dL", True), ("{score}", True), ("cm3", True),
                                      ("years", False), ("mm mm", False), ("", False), ("furlong", False)])
def test_ucum(unit, ok):
    assert byo.is_ucum(unit) is ok


# --- the heads ---------------------------------------------------------------------------------
def spec_and_calibration(tmp_path, manifest, **onnx_args):
    spec = byo.load_package(package(tmp_path, manifest, **onnx_args))
    return spec, byo.head_parameters(byo.LOADED[spec.name][1])


GEOMETRY = np.array([0.5, 0.0, 0.0, 128.0, 128.0], np.float32)  # 128 x 128 source -> 64 input


def test_classification_head(tmp_path):
    spec, calibration = spec_and_calibration(tmp_path, BASE)
    out = byo.postprocess(spec, {"score": np.array([0.75], np.float32)}, GEOMETRY, None, calibration, 0.4)
    assert out.probability == pytest.approx(1 / (1 + math.exp(-(2.0 * 0.75 - 1.0))), abs=1e-6)
    assert out.positive and list(out.location) == [-1, -1, -1, -1] and out.measurements.size == 0
    out = byo.postprocess(spec, {"score": np.array([0.0], np.float32)}, GEOMETRY, None, calibration, 0.4)
    assert out.probability == pytest.approx(1 / (1 + math.e), abs=1e-6) and not out.positive
    # an empty calibration falls back to the loaded package's head
    assert byo.postprocess(spec, {"score": np.array([0.0])}, GEOMETRY, None, {}, 0.4).probability == pytest.approx(
        out.probability)


def test_classification_of_a_probability_output(tmp_path):
    manifest = with_(with_(BASE, "outputs", {"probability": "score"}), "head.calibration", {"a": 1.0, "b": 0.0})
    spec, calibration = spec_and_calibration(tmp_path, manifest)
    out = byo.postprocess(spec, {"score": np.array([0.8])}, GEOMETRY, None, calibration, 0.5)
    assert out.probability == pytest.approx(0.8, abs=1e-6) and out.positive


def test_detection_head_locates_the_peak(tmp_path):
    manifest = with_(with_(BASE, "outputs", {"logit": "score", "heatmap": "cam"}), "head",
                     {"type": "detection", "threshold": 0.5})
    spec, calibration = spec_and_calibration(tmp_path, manifest, outputs={"score": (1,), "cam": (1, 8, 8)})
    heatmap = np.full((1, 8, 8), -8.0, np.float32)
    heatmap[0, 2, 5] = 6.0  # cell (2, 5) of 8 x 8 px on the 64 px input = rows 16-24, cols 40-48
    out = byo.postprocess(spec, {"score": np.array([3.0]), "cam": heatmap}, GEOMETRY, None, calibration, 0.5)
    assert out.probability == pytest.approx(1 / (1 + math.exp(-3.0)), abs=1e-6) and out.positive
    np.testing.assert_allclose(out.location, [32, 80, 48, 96], atol=1e-3)  # source px = input px / 0.5
    out = byo.postprocess(spec, {"score": np.array([-3.0]), "cam": heatmap}, GEOMETRY, None, calibration, 0.5)
    assert not out.positive and list(out.location) == [-1, -1, -1, -1]


def test_regression_head(tmp_path):
    manifest = with_(with_(BASE, "outputs", {"value": "score"}), "head",
                     {"type": "regression", "measurement": {"name": "bone_age", "unit": "a"},
                      "scale": 20.0, "offset": 1.0, "positive_at": 12.0})
    spec, calibration = spec_and_calibration(tmp_path, manifest)
    assert not spec.has_probability and spec.measurements[0].unit == "a"
    out = byo.postprocess(spec, {"score": np.array([0.6])}, GEOMETRY, None, calibration, spec.default_threshold)
    assert math.isnan(out.probability) and out.measurements.tolist() == [pytest.approx(13.0)] and out.positive
    out = byo.postprocess(spec, {"score": np.array([0.5])}, GEOMETRY, None, calibration, spec.default_threshold)
    assert out.measurements[0] == pytest.approx(11.0) and not out.positive


def test_category_head(tmp_path):
    manifest = with_(with_(BASE, "outputs", {"logits": "score"}), "head",
                     {"type": "category", "measurement": {"name": "density"}, "labels": ["A", "B", "C", "D"],
                      "positive_labels": ["C", "D"], "threshold": 0.5})
    spec, calibration = spec_and_calibration(tmp_path, manifest, outputs={"score": (4,)})
    assert spec.measurements[0].labels == ("A", "B", "C", "D") and spec.measurements[0].unit == "{category}"
    logits = np.array([0.0, 1.0, 3.0, 0.5])
    out = byo.postprocess(spec, {"score": logits}, GEOMETRY, None, calibration, 0.5)
    shares = np.exp(logits) / np.exp(logits).sum()
    assert out.measurements.tolist() == [2.0]
    assert out.probability == pytest.approx(shares[2] + shares[3], abs=1e-6) and out.positive
    manifest = with_(manifest, "head.positive_labels", [])
    spec, calibration = spec_and_calibration(tmp_path, manifest, outputs={"score": (4,)})
    out = byo.postprocess(spec, {"score": logits}, GEOMETRY, None, calibration, 0.5)
    assert math.isnan(out.probability) and not out.positive and not spec.has_probability


# --- the package's preprocess -----------------------------------------------------------------------
def test_package_preprocess_windowing_and_normalisation():
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4000, (300, 200)).astype(np.uint16)
    params = GrayscaleParams(window_center=2000, window_width=4000, voi_function=VoiFunction.LINEAR)
    header = byo.PreprocessSettings(size=64)
    image, box = byo.preprocess_image(stored, params, header)
    expected, _ = preprocess(stored, params, 64)
    np.testing.assert_array_equal(image, expected)
    fixed = byo.PreprocessSettings(size=64, windowing="fixed", window_center=1000, window_width=1000,
                                   mean=0.5, std=0.25)
    image, _ = byo.preprocess_image(stored, params, fixed)
    window, _ = preprocess(stored, GrayscaleParams(window_center=1000, window_width=1000,
                                                    voi_function=VoiFunction.LINEAR_EXACT), 64)
    np.testing.assert_allclose(image, (window - 0.5) / 0.25, atol=1e-6)
    percentile = byo.PreprocessSettings(size=64, windowing="percentile", percentile_low=10, percentile_high=90)
    gradient = np.repeat(np.linspace(0, 4000, 300)[:, None], 200, axis=1).astype(np.uint16)
    image, _ = byo.preprocess_image(gradient, params, percentile)
    rows = image[:, 21]  # a column inside the letterboxed image: 10 % of rows black, 10 % white
    assert (rows == 0).sum() >= 6 and (rows == 1).sum() >= 6 and 0 < rows[32] < 1
    # the config parameters round-trip into the settings the Triton model uses
    family = byo.load_package(EXAMPLE).family
    parameters = family.preprocess_parameters()
    settings = byo.PreprocessSettings.from_parameters(lambda key, default: parameters.get(key, default))
    assert (settings.size, settings.windowing, settings.mean, settings.std) == (128, "header", 0.5, 0.25)


def test_catalog_unchanged_without_the_variable():
    assert set(CATALOG) == set(BUILTIN_TOOLS) or os.environ.get("MOSMEDAI_TOOL_PACKAGES")


def test_cli_tools_check_and_install(tmp_path, capsys):
    from mosmedai.local.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["tools", "check", str(EXAMPLE)])
    assert exit_.value.code == 0 and "demo_bright_spot: detection head" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["tools", "install", str(EXAMPLE), "--repository", str(tmp_path / "r")])
    assert exit_.value.code == 0 and (tmp_path / "r" / "demo_bright_spot" / "config.pbtxt").exists()
    bad = package(tmp_path, with_(BASE, "head.threshold", 2))
    with pytest.raises(SystemExit) as exit_:
        main(["tools", "check", str(bad)])
    assert exit_.value.code == 1 and "head.threshold" in capsys.readouterr().err
