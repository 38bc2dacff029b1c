"""Renders the Triton model repository's configs from the tool catalog.

``python -m mosmedai.model_repo`` (or ``make model-configs``) rewrites every
``config.pbtxt`` and ``model.py`` shim; a test checks that the committed files are what
this renders, so the catalog stays the one place a tool is described. Trained artefacts
(``model.onnx``, ``calibration.json``) and model cards are written by
``mosmedai.training``, never here.

Tensor contract of a tool ``T`` of family ``F`` (batch dimension first, Triton style):

    ensemble T       in:  pixels UINT16 [H,W], params FP32 [8], voi_lut FP32 [L]
                     out: probability FP32 [1], positive BOOL [1], location FP32 [4]
    F_preprocess     pixels, params, voi_lut -> image FP32 [1,S,S], geometry FP32 [5]
    T_net            image -> logit FP32 [1], heatmap FP32 [1,32,32]
    T_post           logit, heatmap, geometry -> probability, positive, location
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mosmedai.imaging import N_PARAMS, NETWORK_SIZE
from mosmedai.tools import CATALOG, ToolSpec

MAX_BATCH_SIZE = 16
HEATMAP_SIZE = NETWORK_SIZE // 8
#: Default decision thresholds on the calibrated probability, chosen on the calibration
#: split (see each tool's MODEL_CARD.md). Deployments override them per model.
THRESHOLDS = {"cxr_opacity": 0.5, "cxr_nodule": 0.5, "cxr_pneumothorax": 0.5}

HEADER = "# Rendered by `python -m mosmedai.model_repo` from mosmedai/tools.py; edit there.\n"


def _tensor(name: str, data_type: str, dims: list[int]) -> str:
    return f'  {{ name: "{name}" data_type: {data_type} dims: [ {", ".join(map(str, dims))} ] }}'


def _io(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _python_model(name: str, inputs: list[str], outputs: list[str], instances: int,
                  parameters: dict[str, str], dynamic_batching: bool) -> str:
    text = HEADER + f'name: "{name}"\nbackend: "python"\nmax_batch_size: {MAX_BATCH_SIZE}\n'
    text += _io("input", inputs) + _io("output", outputs)
    text += f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]\n"
    if dynamic_batching:
        # No added delay: a request reaching an idle model runs at once; under load the
        # requests that queued while the instances were busy form the next batch.
        text += "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
    for key, value in parameters.items():
        text += f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'
    return text


PREPROCESS_INPUTS = [
    _tensor("pixels", "TYPE_UINT16", [-1, -1]),
    _tensor("params", "TYPE_FP32", [N_PARAMS]),
    _tensor("voi_lut", "TYPE_FP32", [-1]),
]
PREPROCESS_OUTPUTS = [
    _tensor("image", "TYPE_FP32", [1, NETWORK_SIZE, NETWORK_SIZE]),
    _tensor("geometry", "TYPE_FP32", [5]),
]
NETWORK_OUTPUTS = [_tensor("logit", "TYPE_FP32", [1]), _tensor("heatmap", "TYPE_FP32", [1, HEATMAP_SIZE, HEATMAP_SIZE])]
TOOL_OUTPUTS = [
    _tensor("probability", "TYPE_FP32", [1]),
    _tensor("positive", "TYPE_BOOL", [1]),
    _tensor("location", "TYPE_FP32", [4]),
]


def preprocess_config(family: str, instances: int) -> str:
    return _python_model(f"{family}_preprocess", PREPROCESS_INPUTS, PREPROCESS_OUTPUTS, instances,
                         {"network_size": str(NETWORK_SIZE)}, dynamic_batching=False)


def network_config(spec: ToolSpec, instances: int) -> str:
    return _python_model(spec.network_model, [PREPROCESS_OUTPUTS[0]], NETWORK_OUTPUTS, instances,
                         {}, dynamic_batching=True)


def postprocess_config(spec: ToolSpec) -> str:
    inputs = NETWORK_OUTPUTS + [PREPROCESS_OUTPUTS[1]]
    return _python_model(spec.postprocess_model, inputs, TOOL_OUTPUTS, 1,
                         {"threshold": str(THRESHOLDS.get(spec.name, 0.5))}, dynamic_batching=False)


def _step(model: str, mapping_in: dict[str, str], mapping_out: dict[str, str]) -> str:
    lines = [f'  {{\n    model_name: "{model}"\n    model_version: -1']
    lines += [f'    input_map {{ key: "{k}" value: "{v}" }}' for k, v in mapping_in.items()]
    lines += [f'    output_map {{ key: "{k}" value: "{v}" }}' for k, v in mapping_out.items()]
    return "\n".join(lines) + "\n  }"


def ensemble_config(spec: ToolSpec) -> str:
    text = HEADER + f'name: "{spec.name}"\nplatform: "ensemble"\nmax_batch_size: {MAX_BATCH_SIZE}\n'
    text += _io("input", PREPROCESS_INPUTS) + _io("output", TOOL_OUTPUTS)
    steps = [
        _step(spec.preprocess_model,
              {"pixels": "pixels", "params": "params", "voi_lut": "voi_lut"},
              {"image": "image", "geometry": "geometry"}),
        _step(spec.network_model, {"image": "image"}, {"logit": "logit", "heatmap": "heatmap"}),
        _step(spec.postprocess_model,
              {"logit": "logit", "heatmap": "heatmap", "geometry": "geometry"},
              {"probability": "probability", "positive": "positive", "location": "location"}),
    ]
    return text + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"


def _shim(class_name: str) -> str:
    return (
        '"""Triton Python-backend entry point; the implementation is shared (mosmedai.triton_models)."""\n\n'
        f"from mosmedai.triton_models import {class_name} as TritonPythonModel  # noqa: F401\n"
    )


def rendered_files(instances: int = 2) -> dict[str, str]:
    """Relative path -> content of every rendered file."""
    files: dict[str, str] = {}
    for spec in CATALOG.values():
        files[f"{spec.preprocess_model}/config.pbtxt"] = preprocess_config(spec.family, instances)
        files[f"{spec.preprocess_model}/1/model.py"] = _shim("PreprocessModel")
        files[f"{spec.network_model}/config.pbtxt"] = network_config(spec, instances)
        files[f"{spec.network_model}/1/model.py"] = _shim("OnnxNetworkModel")
        files[f"{spec.postprocess_model}/config.pbtxt"] = postprocess_config(spec)
        files[f"{spec.postprocess_model}/1/model.py"] = _shim("PostprocessModel")
        files[f"{spec.name}/config.pbtxt"] = ensemble_config(spec)
        files[f"{spec.name}/1/.gitkeep"] = ""  # an ensemble's version folder is empty
    return files


def write(repository: Path, instances: int = 2) -> list[Path]:
    written = []
    for relative, content in rendered_files(instances).items():
        path = repository / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != content:
            path.write_text(content)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    from mosmedai.config import REPO_ROOT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--instances", type=int, default=2, help="CPU instances per step")
    args = parser.parse_args(argv)
    for path in write(args.repository, args.instances):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
