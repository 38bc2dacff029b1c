"""Renders the Triton model repository's configs from the tool catalog.

``python -m mosmedai.serving.model_repo`` (or ``make model-configs``) rewrites every
``config.pbtxt`` and ``model.py`` shim; a test checks that the committed files are what
this renders, so the catalog (``mosmedai.catalog.families.*``) stays the one place a tool is
described. Trained artefacts (``model.onnx``, ``calibration.json``) and model cards are
written by ``mosmedai_training``, never here.

Tensor contracts: see ``mosmedai.catalog.families``. Two variants:

- ``cpu`` (the committed repository): every network step runs its ``model.onnx`` in ONNX
  Runtime inside the Python backend;
- ``gpu`` (``--variant gpu``, for a GPU pool): every network step is
  ``platform: "tensorrt_plan"`` with ``model.plan`` built from the same ONNX by
  ``python -m mosmedai.serving.tensorrt_build build`` for that GPU and TensorRT version (engines
  are cached by both); the pre and post steps stay on CPU. It holds version 1 of each
  tool only (one engine per tool).

Versions side by side (``ToolSpec.versions``): a Triton ensemble's config is per model,
not per version, so each tool version gets an ensemble of its own, ``<tool>`` for
version 1 and ``<tool>_v<N>`` after (``ToolSpec.ensemble``), whose network and
postprocess steps pin ``model_version: N``. Those two models hold one version folder per
tool version (``<tool>_net/<N>/model.onnx``, ``<tool>_post/<N>/calibration.json``) and a
``version_policy`` listing them all (Triton's default policy would load only the latest).
The shared preprocess has version 1 only and is taken at its latest. Each version's model
card and held-out evaluation sit in its ensemble's folder (``<ensemble>/MODEL_CARD.md``,
``<ensemble>/evaluation.json``), written by ``python -m mosmedai_training evaluate
--version N``.

Import order of the catalog, one way: ``families`` and ``byo`` (tool definitions) <-
``tools`` (the catalog) <- this module (the repository rendered from the catalog, and
tool packages installed into it: :func:`install_package`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from mosmedai.catalog import byo
from mosmedai.catalog.families import IMAGE, ToolSpec
from mosmedai.catalog.imaging import N_PARAMS, NETWORK_SIZE
from mosmedai.catalog.tools import BUILTIN_TOOLS, CATALOG
from mosmedai.catalog.volumes import N_GEOMETRY
from mosmedai.serving.routing import ROUTINE, SCREENING, URGENT, priority_of

MAX_BATCH_SIZE = 16
VARIANTS = ("cpu", "gpu")

HEADER = "# Rendered by `python -m mosmedai.serving.model_repo` from mosmedai/families; edit there.\n"

#: CPU instances per model: chest radiographs carry most of the national load, so the
#: shared radiograph preprocess and the chest X-ray networks get two; every other step one
#: (each Python-backend instance is a process: 18 tools x 2 would not fit the 8 GB budget).
BUSY_FAMILIES = frozenset({"chest_xray"})

#: Urgent work first in Triton: its rate limiter gives each execution of a model instance
#: one "compute" slot of the server's few (``rate_limit_args``), and a waiting instance of
#: priority p gets 1/p of the turns of one of priority 1. (The dynamic batcher's priority
#: levels would order requests within one model's queue; every model here serves tools of
#: one class, so only the order across models matters.) A step that tools of several classes
#: share (xr_preprocess) runs at the most urgent of them.
RATE_LIMIT_RESOURCE = "compute"
RATE_LIMIT_PRIORITY = {URGENT: 1, ROUTINE: 2, SCREENING: 4}


def rate_limit_args(slots: int) -> list[str]:
    """tritonserver's arguments for the rate limiter: ``slots`` executions at once."""
    if slots < 1:
        raise ValueError(f"Triton execution slots must be at least 1, not {slots}")
    return ["--rate-limit=execution_count", f"--rate-limit-resource={RATE_LIMIT_RESOURCE}:{slots}"]


def step_priority(model: str, specs: list[ToolSpec]) -> int:
    """The rate-limiter priority of a composing model: that of the most urgent tool using it."""
    classes = [priority_of(spec) for spec in specs
               if model in (spec.preprocess_model, spec.network_model, spec.postprocess_model)]
    return RATE_LIMIT_PRIORITY[min(classes, default=ROUTINE)]


def _instance_group(kind: str, count: int, priority: int) -> str:
    return (f"instance_group [ {{ kind: {kind} count: {count} rate_limiter {{ resources [ "
            f'{{ name: "{RATE_LIMIT_RESOURCE}" count: 1 }} ] priority: {priority} }} }} ]\n')


def _tensor(name: str, data_type: str, dims: tuple[int, ...] | list[int]) -> str:
    return f'  {{ name: "{name}" data_type: {data_type} dims: [ {", ".join(map(str, dims))} ] }}'


def _io(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _parameters(parameters: dict[str, str]) -> str:
    return "".join(f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'
                   for key, value in parameters.items())


def _version_policy(versions: tuple[int, ...] | None) -> str:
    if versions is None:
        return ""
    return f"version_policy: {{ specific: {{ versions: [ {', '.join(map(str, versions))} ] }} }}\n"


def _python_model(name: str, inputs: list[str], outputs: list[str], instances: int,
                  parameters: dict[str, str], dynamic_batching: bool, specs: list[ToolSpec],
                  versions: tuple[int, ...] | None = None) -> str:
    text = HEADER + f'name: "{name}"\nbackend: "python"\nmax_batch_size: {MAX_BATCH_SIZE}\n'
    text += _version_policy(versions)
    text += _io("input", inputs) + _io("output", outputs)
    text += _instance_group("KIND_CPU", instances, step_priority(name, specs))
    if dynamic_batching:
        # No added delay: a request reaching an idle model runs at once; under load the
        # requests that queued while the instances were busy form the next batch.
        text += "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
    return text + _parameters(parameters)


# --- tensors ---------------------------------------------------------------------------
IMAGE_INPUTS = [
    _tensor("pixels", "TYPE_UINT16", [-1, -1]),
    _tensor("params", "TYPE_FP32", [N_PARAMS]),
    _tensor("voi_lut", "TYPE_FP32", [-1]),
]
XR_GEOMETRY = _tensor("geometry", "TYPE_FP32", [5])
VOLUME_GEOMETRY = _tensor("geometry", "TYPE_FP32", [N_GEOMETRY])


def network_input_dims(spec: ToolSpec) -> tuple[int, ...]:
    if spec.kind != IMAGE:
        return (1, *spec.family.grid)
    size = getattr(spec.family, "network_size", NETWORK_SIZE)  # a tool package may set its own
    return (1, size, size)


def ensemble_inputs(spec: ToolSpec) -> list[str]:
    if spec.kind == IMAGE:
        return IMAGE_INPUTS
    return [_tensor("volume", "TYPE_INT16", spec.family.grid), VOLUME_GEOMETRY]


def tool_outputs(spec: ToolSpec) -> list[str]:
    outputs = [
        _tensor("probability", "TYPE_FP32", [1]),
        _tensor("positive", "TYPE_BOOL", [1]),
        _tensor("location", "TYPE_FP32", [4]),
    ]
    if spec.measurements:
        outputs.append(_tensor("measurements", "TYPE_FP32", [len(spec.measurements)]))
    return outputs


def output_names(spec: ToolSpec) -> tuple[str, ...]:
    names = ("probability", "positive", "location")
    return names + ("measurements",) if spec.measurements else names


def _network_outputs(spec: ToolSpec) -> list[str]:
    return [_tensor(t.name, t.data_type, t.dims) for t in spec.network_outputs]


# --- models ----------------------------------------------------------------------------
def _users(spec: ToolSpec) -> list[ToolSpec]:
    """Every tool that may share a step with ``spec``: the catalog's, and spec itself (a package's)."""
    return [*CATALOG.values(), spec]


def preprocess_config(spec: ToolSpec) -> str:
    family = spec.family
    instances = 2 if family.kind == IMAGE else 1
    image = _tensor("image", "TYPE_FP32", network_input_dims(spec))
    if family.kind == IMAGE:
        # a tool package's own preprocess (mosmedai.catalog.byo.PackageFamily) adds its size,
        # windowing and normalisation; the shared xr_preprocess has the size only
        parameters = (family.preprocess_parameters() if hasattr(family, "preprocess_parameters")
                      else {"network_size": str(NETWORK_SIZE)})
        return _python_model(family.preprocess, IMAGE_INPUTS, [image, XR_GEOMETRY], instances,
                             parameters, dynamic_batching=False, specs=_users(spec))
    low, high = family.window
    return _python_model(family.preprocess, [_tensor("volume", "TYPE_INT16", family.grid)], [image], instances,
                         {"window_low": str(low), "window_high": str(high)}, dynamic_batching=False,
                         specs=_users(spec))


def variant_versions(spec: ToolSpec, variant: str = "cpu") -> tuple[int, ...]:
    """The tool versions a variant of the repository holds: all (cpu), version 1 (gpu)."""
    return spec.versions if variant == "cpu" else (1,)


def network_config(spec: ToolSpec, variant: str = "cpu") -> str:
    image = _tensor("image", "TYPE_FP32", network_input_dims(spec))
    versions = variant_versions(spec, variant)
    if variant == "cpu":
        instances = 2 if spec.family.name in BUSY_FAMILIES else 1
        return _python_model(spec.network_model, [image], _network_outputs(spec), instances, {},
                             dynamic_batching=True, specs=[spec], versions=versions)
    text = HEADER + (f'name: "{spec.network_model}"\nplatform: "tensorrt_plan"\n'
                     f'default_model_filename: "model.plan"\nmax_batch_size: {MAX_BATCH_SIZE}\n')
    text += _version_policy(versions)
    text += _io("input", [image]) + _io("output", _network_outputs(spec))
    text += _instance_group("KIND_GPU", 1, step_priority(spec.network_model, [spec]))
    return text + "dynamic_batching { max_queue_delay_microseconds: 0 }\n"


def postprocess_config(spec: ToolSpec, variant: str = "cpu") -> str:
    inputs = _network_outputs(spec) + [XR_GEOMETRY if spec.kind == IMAGE else VOLUME_GEOMETRY]
    if spec.kind != IMAGE:
        inputs.append(_tensor("volume", "TYPE_INT16", spec.family.grid))
    parameters = {"tool": spec.name, "threshold": str(spec.default_threshold)}
    return _python_model(spec.postprocess_model, inputs, tool_outputs(spec), 1, parameters,
                         dynamic_batching=False, specs=[spec], versions=variant_versions(spec, variant))


def _step(model: str, mapping_in: dict[str, str], mapping_out: dict[str, str], version: int = -1) -> str:
    lines = [f'  {{\n    model_name: "{model}"\n    model_version: {version}']
    lines += [f'    input_map {{ key: "{k}" value: "{v}" }}' for k, v in mapping_in.items()]
    lines += [f'    output_map {{ key: "{k}" value: "{v}" }}' for k, v in mapping_out.items()]
    return "\n".join(lines) + "\n  }"


def ensemble_config(spec: ToolSpec, version: int = 1) -> str:
    """The ensemble of one tool version: its network and postprocess steps pinned to it."""
    text = HEADER + f'name: "{spec.ensemble(version)}"\nplatform: "ensemble"\nmax_batch_size: {MAX_BATCH_SIZE}\n'
    text += _io("input", ensemble_inputs(spec)) + _io("output", tool_outputs(spec))
    network_outputs = {t.name: t.name for t in spec.network_outputs}
    if spec.kind == IMAGE:
        preprocess = _step(spec.preprocess_model, {"pixels": "pixels", "params": "params", "voi_lut": "voi_lut"},
                           {"image": "image", "geometry": "geometry"})
        post_inputs = {**network_outputs, "geometry": "geometry"}
    else:
        preprocess = _step(spec.preprocess_model, {"volume": "volume"}, {"image": "image"})
        post_inputs = {**network_outputs, "geometry": "geometry", "volume": "volume"}
    steps = [
        preprocess,
        _step(spec.network_model, {"image": "image"}, network_outputs, version),
        _step(spec.postprocess_model, post_inputs, {name: name for name in output_names(spec)}, version),
    ]
    return text + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"


def _shim(class_name: str) -> str:
    return (
        '"""Triton Python-backend entry point; the implementation is shared (mosmedai.serving.triton_models)."""\n\n'
        f"from mosmedai.serving.triton_models import {class_name} as TritonPythonModel  # noqa: F401\n"
    )


def rendered_files(variant: str = "cpu", tools: list[str] | None = None,
                   specs: list[ToolSpec] | None = None) -> dict[str, str]:
    """Relative path -> content of every rendered file (of the named tools, or of the given
    specs, e.g. a tool package's; default every tool of the catalog)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    files: dict[str, str] = {}
    for spec in specs if specs is not None else [CATALOG[name] for name in tools or list(CATALOG)]:
        files[f"{spec.preprocess_model}/config.pbtxt"] = preprocess_config(spec)
        files[f"{spec.preprocess_model}/1/model.py"] = _shim(
            "PreprocessModel" if spec.kind == IMAGE else "VolumePreprocessModel")
        files[f"{spec.network_model}/config.pbtxt"] = network_config(spec, variant)
        files[f"{spec.postprocess_model}/config.pbtxt"] = postprocess_config(spec, variant)
        for version in variant_versions(spec, variant):
            if variant == "cpu":
                files[f"{spec.network_model}/{version}/model.py"] = _shim("OnnxNetworkModel")
            files[f"{spec.postprocess_model}/{version}/model.py"] = _shim("ToolPostprocessModel")
            ensemble = spec.ensemble(version)
            files[f"{ensemble}/config.pbtxt"] = ensemble_config(spec, version)
            files[f"{ensemble}/1/.gitkeep"] = ""  # an ensemble's version folder is empty
    return files


def write(repository: Path, variant: str = "cpu", tools: list[str] | None = None,
          specs: list[ToolSpec] | None = None) -> list[Path]:
    written = []
    for relative, content in rendered_files(variant, tools, specs).items():
        path = repository / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != content:
            path.write_text(content)
            written.append(path)
    return written


def install_package(package_dir: str | Path, repository: str | Path) -> list[Path]:
    """Add a tool package's tool (mosmedai.catalog.byo) to a Triton model repository; returns the
    files written: ``<name>_net/1/model.onnx`` (the package's ONNX),
    ``<name>_post/1/calibration.json`` (the head's parameters), ``<name>_post/1/manifest.yaml``
    (for the record), and every config and shim rendered here (cpu variant).
    Raises byo.PackageError for an invalid package or one that reuses a built-in tool's name.
    """
    package = Path(package_dir)
    spec = byo.load_package(package)
    manifest = byo.LOADED[spec.name][1]
    if spec.name in BUILTIN_TOOLS:
        raise byo.PackageError([f"{byo.MANIFEST}: name: {spec.name!r} is a built-in tool; choose another name"])
    repository = Path(repository)
    net = repository / spec.network_model / "1"
    post = repository / spec.postprocess_model / "1"
    net.mkdir(parents=True, exist_ok=True)
    post.mkdir(parents=True, exist_ok=True)
    byo.copy_model(package / byo.MODEL, net / byo.MODEL, {t.name for t in spec.network_outputs})
    (post / "calibration.json").write_text(json.dumps(byo.head_parameters(manifest), indent=2) + "\n")
    shutil.copyfile(package / byo.MANIFEST, post / byo.MANIFEST)
    written = [net / byo.MODEL, post / "calibration.json", post / byo.MANIFEST]
    return written + write(repository, "cpu", specs=[spec])


def main(argv: list[str] | None = None) -> None:
    from mosmedai.config import REPO_ROOT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--variant", choices=VARIANTS, default="cpu")
    parser.add_argument("--install-package", type=Path, action="append", metavar="DIR",
                        help="install a tool package (model.onnx + manifest.yaml, see docs/byo-tool-package.md) "
                             "into the repository instead of rendering the catalog")
    args = parser.parse_args(argv)
    if args.install_package:
        for package in args.install_package:
            try:
                paths = install_package(package, args.repository)
            except byo.PackageError as error:
                raise SystemExit(f"{package}: refused:\n{error}") from None
            print(f"installed {package} into {args.repository} ({len(paths)} files written)")
        return
    for path in write(args.repository, args.variant):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()


def read_threshold(repository: str | Path, tool: str) -> float | None:
    """The `threshold` parameter of ``<repository>/<tool>_post/config.pbtxt`` (as
    :func:`postprocess_config` renders it); None without the file or the parameter."""
    import re

    path = Path(repository) / f"{tool}_post" / "config.pbtxt"
    if not path.exists():
        return None
    match = re.search(r'key\s*:\s*"threshold"\s*value\s*\{\s*string_value\s*:\s*"([^"]*)"', path.read_text())
    if match is None:
        return None
    value = float(match.group(1))
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{path}: threshold {value} is not a probability")
    return value
