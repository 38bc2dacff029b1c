"""Bring your own model: a tool package (``model.onnx`` + ``manifest.yaml``) becomes a tool.

A package is a directory::

    wrist_fracture/
      manifest.yaml   what the tool reads (routing), how its input is made, how its outputs
                      become results (the head); see docs/byo-tool-package.md
      model.onnx      one FP32 input ``image`` [batch, 1, S, S] with a dynamic batch axis,
                      FP32 outputs named in the manifest

``load_package(dir)`` validates the manifest against the ONNX graph and returns a
:class:`~mosmedai.catalog.families.ToolSpec` whose family is the package's own (so this module is
its "family module": :func:`postprocess` turns network outputs into results).
Setting ``MOSMEDAI_TOOL_PACKAGES`` (a path list) makes ``mosmedai.catalog.tools`` load packages into
the catalog at import, so the gateway, router and Triton's pre/post steps know the tool;
``mosmedai.serving.model_repo.install_package(dir, repository)`` adds the tool to a Triton model
repository.

Import order of the catalog, one way: ``families`` and ``byo`` (tool definitions, from code
or from a package) <- ``tools`` (the catalog) <- ``model_repo`` (the Triton repository
rendered from the catalog, packages installed into it). This module imports neither
``tools`` nor ``model_repo``.

Only 2-D (image) packages are supported; volume packages are refused (see the docs).
Every refusal is a :class:`PackageError` whose lines name the field, e.g.
``manifest.yaml: outputs.logit: 'score' is not an output of model.onnx (outputs: prob, cam)``.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mosmedai.catalog.families import (
    IMAGE,
    NO_LOCATION,
    Family,
    Measurement,
    TensorSpec,
    ToolOutput,
    ToolSpec,
)
from mosmedai.catalog.imaging import (
    NETWORK_SIZE,
    GrayscaleParams,
    Letterbox,
    VoiFunction,
)

MANIFEST = "manifest.yaml"
MODEL = "model.onnx"
#: Name of the network input in every Triton config and ensemble.
INPUT_NAME = "image"
#: The shared radiograph preprocess (header window, [0, 1], 256 x 256).
XR_PREPROCESS = "xr_preprocess"

#: Modality (0008,0060) values a 2-D package may read: grayscale projection images.
IMAGE_MODALITIES = frozenset({"CR", "DX", "DR", "MG", "RF", "XA", "PX", "IO"})
#: Sides of the square network input accepted, pixels.
MIN_SIZE, MAX_SIZE = 32, 1024
#: Tensor names the ensembles use for their own tensors: a network output may not take one.
RESERVED_NAMES = frozenset({"pixels", "params", "voi_lut", "image", "geometry", "volume",
                            "probability", "positive", "location", "measurements"})

#: Outputs each head reads (role -> required); ``classification`` reads one of logit/probability.
HEAD_OUTPUTS = {
    "classification": ({"logit"}, {"probability"}),
    "detection": ({"logit", "heatmap"},),
    "regression": ({"value"},),
    "category": ({"logits"},),
}

# --- UCUM (the subset a tool reports) ------------------------------------------------------
_UCUM_PREFIXES = ("da", "Y", "Z", "E", "P", "T", "G", "M", "k", "h", "d", "c", "m", "u", "n", "p", "f")
_UCUM_METRIC = {"m", "g", "s", "L", "l", "mol", "Hz", "N", "Pa", "J", "W", "A", "V", "Ohm", "Gy", "Sv",
                "Bq", "K", "Cel", "rad", "sr", "eq", "osm", "U", "kat", "t", "bar"}
_UCUM_PLAIN = {"1", "%", "deg", "min", "h", "d", "wk", "mo", "a", "'", "''", "[iU]", "[IU]", "[ppm]",
               "[ppb]", "[ppth]", "[hnsf'U]", "[in_i]", "[lb_av]", "[degF]", "[pH]", "[beats]/min"}
_UCUM_ATOM = re.compile(r"^(?P<atom>\[[^\]]+\]|[A-Za-z%']+|1)(?P<exp>[+-]?\d+)?(?P<ann>\{[^{}]*\})?$")


def is_ucum(unit: str) -> bool:
    """A practical UCUM check: products ('.') and quotients ('/') of known atoms with
    optional SI prefixes and integer exponents, or annotations ``{...}`` (e.g. ``{category}``)."""
    if not unit or " " in unit:
        return False
    if re.fullmatch(r"\{[^{}]+\}", unit):
        return True
    terms = re.split(r"[./]", unit[1:] if unit.startswith("/") else unit)
    for term in terms:
        if re.fullmatch(r"\{[^{}]+\}", term):
            continue
        match = _UCUM_ATOM.match(term)
        if not match:
            return False
        atom = match["atom"]
        if atom in _UCUM_PLAIN or atom in _UCUM_METRIC:
            continue
        if not any(atom.startswith(p) and atom[len(p):] in _UCUM_METRIC for p in _UCUM_PREFIXES):
            return False
    return True


class PackageError(ValueError):
    """A package refused; one line per problem, each naming the file and field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --- manifest schema -------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Windowing(_Strict):
    """How stored values become [0, 1]: ``header`` (the DICOM VOI LUT or window, a 0.5-99.5
    percentile window when there is none: what the built-in tools see), ``fixed`` (this
    center/width, in modality units after Rescale, whatever the header says), ``percentile``
    (the low/high percentiles of the image, ignoring the header)."""

    mode: Literal["header", "fixed", "percentile"] = "header"
    center: float | None = None
    width: float | None = Field(None, gt=0)
    low: float = Field(0.5, ge=0, lt=100)
    high: float = Field(99.5, gt=0, le=100)

    @model_validator(mode="after")
    def _consistent(self):
        if self.mode == "fixed" and (self.center is None or self.width is None):
            raise ValueError("mode 'fixed' needs center and width")
        if self.mode != "fixed" and (self.center is not None or self.width is not None):
            raise ValueError(f"center/width only apply to mode 'fixed', not {self.mode!r}")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class Normalisation(_Strict):
    """After windowing to [0, 1]: x -> (x - mean) / std (identity by default)."""

    mean: float = 0.0
    std: float = Field(1.0, gt=0)


class InputSpec(_Strict):
    kind: Literal["image", "volume"] = "image"
    size: int = Field(NETWORK_SIZE, ge=MIN_SIZE, le=MAX_SIZE, description="side of the square input, pixels")
    windowing: Windowing = Windowing()
    normalisation: Normalisation = Normalisation()

    @field_validator("kind")
    @classmethod
    def _image_only(cls, kind: str) -> str:
        if kind == "volume":
            raise ValueError("volume packages are not supported yet: only 2-D 'image' packages can be installed "
                             "(CT/MR tools need a family grid and a volume preprocess; see docs/byo-tool-package.md)")
        return kind


class Calibration(_Strict):
    """Platt scaling p = sigmoid(a * logit + b)."""

    a: float = 1.0
    b: float = 0.0

    @model_validator(mode="after")
    def _finite(self):
        if not (math.isfinite(self.a) and math.isfinite(self.b)):
            raise ValueError("a and b must be finite")
        return self


class MeasurementSpec(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")
    unit: str | None = None  # UCUM; a category's is "{category}"
    description: str = ""


class Head(_Strict):
    type: Literal["classification", "detection", "regression", "category"]
    threshold: float = 0.5  # probability heads: positive when probability >= threshold
    calibration: Calibration = Calibration()
    measurement: MeasurementSpec | None = None  # regression, category
    scale: float = 1.0  # regression: value = scale * output + offset
    offset: float = 0.0
    positive_at: float | None = None  # regression: positive when value >= positive_at (or <=, see positive_below)
    positive_below: bool = False
    labels: tuple[str, ...] = ()  # category
    positive_labels: tuple[str, ...] = ()  # category: probability = softmax mass of these labels

    @field_validator("threshold")
    @classmethod
    def _probability(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{value} is not a probability in [0, 1]")
        return value

    @model_validator(mode="after")
    def _per_type(self):
        problems = []
        needs_measurement = self.type in ("regression", "category")
        if needs_measurement and self.measurement is None:
            problems.append(f"a {self.type} head needs measurement (name, unit, description)")
        if not needs_measurement and self.measurement is not None:
            problems.append(f"measurement applies to regression and category heads, not {self.type}")
        if self.type == "regression":
            if self.measurement is not None and (self.measurement.unit is None or not is_ucum(self.measurement.unit)):
                problems.append(f"measurement.unit: {self.measurement.unit!r} is not a UCUM unit "
                                "(e.g. 'mm', 'deg', '%', 'a', '[hnsf'U]', '{score}')")
            if not (math.isfinite(self.scale) and math.isfinite(self.offset)) or self.scale == 0:
                problems.append("scale must be finite and non-zero, offset finite")
        if self.type == "category":
            if self.measurement is not None and self.measurement.unit not in (None, "{category}"):
                problems.append(f"measurement.unit: a category's unit is '{{category}}', not {self.measurement.unit!r}")
            if len(self.labels) < 2 or any(not str(label).strip() for label in self.labels):
                problems.append(f"labels: a category head needs two or more non-empty labels, got {list(self.labels)}")
            elif len(set(self.labels)) != len(self.labels):
                problems.append(f"labels: duplicate labels in {list(self.labels)}")
            unknown = [label for label in self.positive_labels if label not in self.labels]
            if unknown:
                problems.append(f"positive_labels: {unknown} are not among labels {list(self.labels)}")
        elif self.labels or self.positive_labels:
            problems.append(f"labels apply to category heads, not {self.type}")
        if self.type != "regression" and self.positive_at is not None:
            problems.append(f"positive_at applies to regression heads, not {self.type}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def has_probability(self) -> bool:
        return self.type in ("classification", "detection") or bool(self.positive_labels)


class Manifest(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{1,47}$", description="tool name (lower case, digits, _)")
    title: str = Field(min_length=1)
    finding: str = Field(min_length=1, description="what a positive result means, for people")
    version: str = "1"
    modalities: tuple[str, ...] = Field(min_length=1)
    body_parts: tuple[str, ...] = ()
    views: tuple[str, ...] = ()
    view_alone_suffices: bool = False
    description_keywords: tuple[str, ...] = ()
    exclude_keywords: tuple[str, ...] = ()
    required_keywords: tuple[str, ...] = ()
    input: InputSpec = InputSpec()
    outputs: dict[str, str] = Field(min_length=1, description="head role -> ONNX output name")
    head: Head

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        for suffix in ("_net", "_post", "_preprocess"):
            if name.endswith(suffix):
                raise ValueError(f"{name!r} ends in {suffix!r}, which names the tool's Triton steps")
        return name

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        values = tuple(v.upper() for v in values)
        unknown = [v for v in values if v not in IMAGE_MODALITIES]
        if unknown:
            raise ValueError(f"{unknown} not allowed: a 2-D package reads {sorted(IMAGE_MODALITIES)}")
        return values

    @field_validator("body_parts", "views", "description_keywords", "exclude_keywords", "required_keywords")
    @classmethod
    def _upper(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(v).strip().upper() for v in values if str(v).strip())


def _loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def parse_manifest(text: str | dict, source: str = MANIFEST) -> Manifest:
    """YAML text (or its parsed dict) -> Manifest; PackageError naming each bad field."""
    import yaml

    if isinstance(text, str):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise PackageError([f"{source}: not valid YAML: {error}"]) from None
    else:
        data = text
    if not isinstance(data, dict):
        raise PackageError([f"{source}: expected a mapping of fields, got {type(data).__name__}"])
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            location = _loc(tuple(p for p in item["loc"] if not str(p).startswith("function-")))
            problems.append(f"{source}: {location or '(top level)'}: {message}")
        raise PackageError(problems) from None


# --- the package family ------------------------------------------------------------------------
@dataclass(frozen=True)
class PreprocessSettings:
    """What a preprocess model does beyond the default chain (config parameters, parsed)."""

    size: int = NETWORK_SIZE
    windowing: str = "header"
    window_center: float | None = None
    window_width: float | None = None
    percentile_low: float = 0.5
    percentile_high: float = 99.5
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def from_parameters(cls, get) -> "PreprocessSettings":
        """``get(key, default)`` reads a config parameter (triton_models._parameter)."""
        def number(key, default):
            value = get(key, None)
            return default if value is None else float(value)

        return cls(size=int(get("network_size", str(NETWORK_SIZE))), windowing=get("windowing", "header"),
                   window_center=number("window_center", None), window_width=number("window_width", None),
                   percentile_low=number("percentile_low", 0.5), percentile_high=number("percentile_high", 99.5),
                   mean=number("mean", 0.0), std=number("std", 1.0))

    @property
    def is_default(self) -> bool:
        """Whether xr_preprocess already does this (its size, the header's window, no normalisation)."""
        return (self.size, self.windowing, self.mean, self.std) == (NETWORK_SIZE, "header", 0.0, 1.0)

    def parameters(self) -> dict[str, str]:
        """The preprocess model's config parameters (the inverse of ``from_parameters``)."""
        parameters = {"network_size": str(self.size)}  # all xr_preprocess has
        if self.windowing != "header":
            parameters["windowing"] = self.windowing
        if self.windowing == "fixed":
            parameters |= {"window_center": repr(self.window_center), "window_width": repr(self.window_width)}
        if self.windowing == "percentile":
            parameters |= {"percentile_low": repr(self.percentile_low), "percentile_high": repr(self.percentile_high)}
        if (self.mean, self.std) != (0.0, 1.0):
            parameters |= {"mean": repr(self.mean), "std": repr(self.std)}
        return parameters


@dataclass(frozen=True)
class PackageFamily(Family):
    """A package's own family: its input size, windowing and normalisation."""

    preprocessing: PreprocessSettings = PreprocessSettings()

    @property
    def network_size(self) -> int:
        return self.preprocessing.size

    def preprocess_parameters(self) -> dict[str, str]:
        """The preprocess model's config parameters (read by triton_models.PreprocessModel)."""
        return self.preprocessing.parameters()


def family_of(manifest: Manifest) -> PackageFamily:
    inp = manifest.input
    w = inp.windowing
    settings = PreprocessSettings(size=inp.size, windowing=w.mode, window_center=w.center, window_width=w.width,
                                  percentile_low=w.low, percentile_high=w.high, mean=inp.normalisation.mean,
                                  std=inp.normalisation.std)
    return PackageFamily(name=f"package_{manifest.name}", kind=IMAGE,
                         preprocess=XR_PREPROCESS if settings.is_default else f"{manifest.name}_preprocess",
                         preprocessing=settings)


def window_params(stored: np.ndarray, params: GrayscaleParams, settings: PreprocessSettings) -> GrayscaleParams:
    """The header's grayscale parameters with the package's windowing applied."""
    from dataclasses import replace

    if settings.windowing == "fixed":
        return replace(params, window_center=float(settings.window_center), window_width=float(settings.window_width),
                       voi_function=VoiFunction.LINEAR_EXACT, lut=None)
    if settings.windowing == "percentile":
        sample = stored[::4, ::4] if stored.size > 65536 else stored
        values = sample.astype(np.float32) * np.float32(params.rescale_slope) + np.float32(params.rescale_intercept)
        low, high = np.percentile(values, (settings.percentile_low, settings.percentile_high))
        width = max(float(high - low), 1e-6)
        # LINEAR_EXACT over [low, high] is exactly clip((v - low) / (high - low), 0, 1)
        return replace(params, window_center=float(low) + width / 2.0, window_width=width,
                       voi_function=VoiFunction.LINEAR_EXACT, lut=None)
    return params


def preprocess_image(stored: np.ndarray, params: GrayscaleParams,
                     settings: PreprocessSettings) -> tuple[np.ndarray, Letterbox]:
    """One frame -> the package network's input (size x size) and its letterbox."""
    from mosmedai.catalog.imaging import preprocess

    image, box = preprocess(stored, window_params(stored, params, settings), settings.size)
    if (settings.mean, settings.std) != (0.0, 1.0):
        # the letterbox padding is 0 before normalisation, like the windowed black
        image = (image - np.float32(settings.mean)) / np.float32(settings.std)
    return image.astype(np.float32, copy=False), box


# --- ONNX validation ---------------------------------------------------------------------------
def _dims(shape) -> list[int | None]:
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


def _onnx_signature(model_path: Path, size: int) -> tuple[dict, dict]:
    """(inputs, outputs): name -> (onnx type, dims with None for dynamic) from ONNX Runtime;
    output dims left dynamic by the graph are read from one dry run on a zero image."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    inputs = {t.name: (t.type, _dims(t.shape)) for t in session.get_inputs()}
    outputs = {t.name: (t.type, _dims(t.shape)) for t in session.get_outputs()}
    unknown = any(d is None for _, dims in outputs.values() for d in dims[1:])
    if unknown and list(inputs) == [INPUT_NAME]:
        try:
            values = session.run(None, {INPUT_NAME: np.zeros((1, 1, size, size), np.float32)})
        except Exception:  # noqa: BLE001 - the input check names the problem
            return inputs, outputs
        for (name, (kind, dims)), value in zip(list(outputs.items()), values):
            outputs[name] = (kind, [None, *value.shape[1:]])
    return inputs, outputs


def _validate_against_onnx(manifest: Manifest, model_path: Path, source: str = MANIFEST) -> list[TensorSpec]:
    """The head's outputs as Triton tensors (ONNX names and dims), or PackageError."""
    problems: list[str] = []
    head = manifest.head
    roles = set(manifest.outputs)
    allowed = HEAD_OUTPUTS[head.type]
    if roles not in allowed:
        wanted = " or ".join("{" + ", ".join(sorted(option)) + "}" for option in allowed)
        problems.append(f"{source}: outputs: a {head.type} head reads {wanted}, got {{{', '.join(sorted(roles))}}}")
    if not model_path.exists():
        raise PackageError(problems + [f"{model_path}: missing: a package holds {MODEL} next to {MANIFEST}"])
    try:
        inputs, outputs = _onnx_signature(model_path, manifest.input.size)
    except Exception as error:  # noqa: BLE001 - a bad file, whatever the cause
        raise PackageError(problems + [f"{MODEL}: ONNX Runtime cannot load it: {error}"]) from None

    size = manifest.input.size
    if list(inputs) != [INPUT_NAME]:
        problems.append(f"{MODEL}: the network must have one input named '{INPUT_NAME}' [batch, 1, {size}, {size}], "
                        f"has {list(inputs)} (export with input_names=['{INPUT_NAME}'])")
    else:
        kind, dims = inputs[INPUT_NAME]
        if kind != "tensor(float)":
            problems.append(f"{MODEL}: input '{INPUT_NAME}' is {kind}, must be tensor(float) (FP32)")
        if len(dims) != 4:
            problems.append(f"{source}: input.size: {MODEL} input '{INPUT_NAME}' has rank {len(dims)} {dims}, "
                            f"expected [batch, 1, {size}, {size}]")
        else:
            if dims[0] is not None:
                problems.append(f"{MODEL}: input '{INPUT_NAME}' has a fixed batch size {dims[0]}: export with a "
                                f"dynamic first axis (torch.onnx.export(..., dynamic_axes={{'{INPUT_NAME}': {{0: 'batch'}}}}))")
            if dims[1] not in (None, 1):
                problems.append(f"{MODEL}: input '{INPUT_NAME}' has {dims[1]} channels; the preprocess gives 1 (grayscale)")
            if dims[2:] != [size, size] and not (dims[2] is None and dims[3] is None):
                problems.append(f"{source}: input.size: {size} does not match {MODEL} input '{INPUT_NAME}' "
                                f"{dims[2]} x {dims[3]}")

    tensors: list[TensorSpec] = []
    for role, name in manifest.outputs.items():
        if name not in outputs:
            problems.append(f"{source}: outputs.{role}: {name!r} is not an output of {MODEL} "
                            f"(outputs: {', '.join(outputs)})")
            continue
        if name in RESERVED_NAMES:
            problems.append(f"{source}: outputs.{role}: {name!r} is a name the ensemble uses itself; "
                            f"rename the ONNX output (reserved: {', '.join(sorted(RESERVED_NAMES))})")
        kind, dims = outputs[name]
        if kind != "tensor(float)":
            problems.append(f"{source}: outputs.{role}: {MODEL} output {name!r} is {kind}, must be tensor(float)")
        if not dims or dims[0] is not None:
            problems.append(f"{source}: outputs.{role}: {MODEL} output {name!r} {dims} needs a dynamic batch axis first")
            continue
        shape = dims[1:]
        if any(d is None for d in shape):
            problems.append(f"{source}: outputs.{role}: {MODEL} output {name!r} has dynamic dims {dims}")
            continue
        count = int(np.prod(shape)) if shape else 1
        if role in ("logit", "probability", "value") and count != 1:
            problems.append(f"{source}: outputs.{role}: {name!r} must be one number per image ([batch, 1]), "
                            f"{MODEL} gives {['batch', *shape]}")
        if role == "heatmap" and (len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1)):
            problems.append(f"{source}: outputs.heatmap: {name!r} must be [batch, 1, h, w] or [batch, h, w], "
                            f"{MODEL} gives {['batch', *shape]}")
        if role == "logits" and head.type == "category" and count != len(head.labels):
            problems.append(f"{source}: head.labels: {len(head.labels)} labels but {MODEL} output {name!r} "
                            f"gives {count} logits")
        tensors.append(TensorSpec(name, tuple(shape) if shape else (1,)))
    if len(set(manifest.outputs.values())) != len(manifest.outputs):
        problems.append(f"{source}: outputs: one ONNX output for two roles: {manifest.outputs}")
    if problems:
        raise PackageError(problems)
    return tensors


# --- loading ---------------------------------------------------------------------------------
#: Tool name -> (package directory, manifest) of every package loaded in this process.
LOADED: dict[str, tuple[Path, Manifest]] = {}


def read_manifest(package_dir: str | Path) -> Manifest:
    package = Path(package_dir)
    path = package / MANIFEST
    if not path.is_file():
        raise PackageError([f"{package}: no {MANIFEST}: a tool package holds {MANIFEST} and {MODEL}"])
    return parse_manifest(path.read_text(encoding="utf-8"), MANIFEST)


def spec_of(manifest: Manifest, network_outputs: list[TensorSpec]) -> ToolSpec:
    head = manifest.head
    measurements: tuple[Measurement, ...] = ()
    if head.type == "regression":
        m = head.measurement
        measurements = (Measurement(m.name, m.unit, m.description),)
    elif head.type == "category":
        m = head.measurement
        measurements = (Measurement(m.name, "{category}", m.description, labels=tuple(head.labels)),)
    return ToolSpec(
        name=manifest.name, family=family_of(manifest), title=manifest.title, finding=manifest.finding,
        modalities=frozenset(manifest.modalities), network_outputs=tuple(network_outputs),
        measurements=measurements, has_probability=head.has_probability,
        body_parts=frozenset(manifest.body_parts), views=frozenset(manifest.views),
        description_keywords=manifest.description_keywords, exclude_keywords=manifest.exclude_keywords,
        required_keywords=manifest.required_keywords, view_alone_suffices=manifest.view_alone_suffices,
        default_threshold=head.threshold,
    )


def load_package(package_dir: str | Path) -> ToolSpec:
    """Validate a package (manifest and ONNX) and return its ToolSpec; PackageError otherwise."""
    package = Path(package_dir)
    manifest = read_manifest(package)
    tensors = _validate_against_onnx(manifest, package / MODEL)
    LOADED[manifest.name] = (package.resolve(), manifest)
    return spec_of(manifest, tensors)


def head_parameters(manifest: Manifest) -> dict[str, Any]:
    """What ``<name>_post/1/calibration.json`` holds: everything :func:`postprocess` needs."""
    head = manifest.head
    data: dict[str, Any] = {"head": head.type, "outputs": dict(manifest.outputs), "threshold": head.threshold,
                            "a": head.calibration.a, "b": head.calibration.b, "network_size": manifest.input.size,
                            "package_version": manifest.version}
    if head.type == "regression":
        data |= {"scale": head.scale, "offset": head.offset, "positive_at": head.positive_at,
                 "positive_below": head.positive_below}
    if head.type == "category":
        data |= {"labels": list(head.labels), "positive_labels": list(head.positive_labels)}
    return data


# --- the heads (pure numpy) -----------------------------------------------------------------------
def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1.0 - 1e-7)
    return math.log(p / (1.0 - p))


def postprocess(spec: ToolSpec, outputs: dict[str, np.ndarray], geometry: np.ndarray,
                volume: np.ndarray | None, calibration: dict, threshold: float) -> ToolOutput:
    """One image's network outputs -> ToolOutput, by the package's head.

    ``calibration`` is ``calibration.json`` (:func:`head_parameters`); when it lacks the head
    (an empty dict) the parameters of the package loaded in this process are used.

    - classification: p = sigmoid(a * logit + b) (a probability output is turned into its
      logit first); positive when p >= threshold; no location.
    - detection: the same probability; when positive, the box of the heatmap's peak region
      in source pixels (mosmedai.catalog.postprocess.locate).
    - regression: measurement = scale * value + offset; no probability; positive when
      positive_at is set and the value is >= it (<= with positive_below).
    - category: measurement = index of the largest logit; probability = softmax mass of
      positive_labels (NaN when none are named), positive when >= threshold.
    """
    if "head" not in calibration:
        if spec.name not in LOADED:
            raise ValueError(f"{spec.name}: calibration.json has no head and the package is not loaded")
        calibration = {**head_parameters(LOADED[spec.name][1]), **calibration}
    head = calibration["head"]
    names = calibration["outputs"]
    a, b = float(calibration.get("a", 1.0)), float(calibration.get("b", 0.0))

    def one(role: str) -> float:
        return float(np.asarray(outputs[names[role]], np.float64).reshape(-1)[0])

    if head in ("classification", "detection"):
        logit = one("logit") if "logit" in names else _logit(one("probability"))
        probability = _sigmoid(a * logit + b)
        positive = probability >= threshold
        location = NO_LOCATION.copy()
        if head == "detection" and positive:
            from mosmedai.catalog.postprocess import locate

            location = locate(outputs[names["heatmap"]], geometry,
                              network_size=int(calibration.get("network_size", NETWORK_SIZE)))
        return ToolOutput(float(np.float32(probability)), bool(positive), location)
    if head == "regression":
        value = float(calibration.get("scale", 1.0)) * one("value") + float(calibration.get("offset", 0.0))
        cut = calibration.get("positive_at")
        positive = False
        if cut is not None and math.isfinite(value):
            positive = value <= float(cut) if calibration.get("positive_below") else value >= float(cut)
        return ToolOutput(math.nan, bool(positive), NO_LOCATION.copy(), np.array([value], np.float32))
    if head == "category":
        logits = np.asarray(outputs[names["logits"]], np.float64).reshape(-1)
        index = int(np.argmax(logits))
        shares = np.exp(logits - logits.max())
        shares /= shares.sum()
        labels = list(calibration["labels"])
        chosen = [labels.index(label) for label in calibration.get("positive_labels", [])]
        probability = float(np.float32(min(1.0, shares[chosen].sum()))) if chosen else math.nan
        positive = bool(chosen) and probability >= threshold
        return ToolOutput(probability, positive, NO_LOCATION.copy(), np.array([index], np.float32))
    raise ValueError(f"{spec.name}: unknown head {head!r}")


# --- package files ---------------------------------------------------------------------------
def copy_model(source: Path, target: Path, keep: set[str]) -> None:
    """Copy a package's model.onnx; outputs the head does not read are dropped from the
    graph's outputs (Triton's config lists exactly the served outputs)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    extra = [o.name for o in session.get_outputs() if o.name not in keep]
    if not extra:
        shutil.copyfile(source, target)
        return
    try:
        import onnx
    except ModuleNotFoundError:
        raise PackageError([f"{MODEL}: outputs {extra} are not read by the head; remove them from the graph "
                            "(or install the 'onnx' package so install can drop them)"]) from None
    model = onnx.load(str(source))
    kept = [o for o in model.graph.output if o.name in keep]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(target))


def check(package_dir: str | Path) -> str:
    """One-line summary of a valid package (PackageError otherwise)."""
    spec = load_package(package_dir)
    package = Path(package_dir)
    sha = hashlib.sha256((package / MODEL).read_bytes()).hexdigest()[:12]
    manifest = LOADED[spec.name][1]
    return (f"{spec.name}: {manifest.head.type} head, input {manifest.input.size}x{manifest.input.size} "
            f"via {spec.preprocess_model}, outputs {', '.join(t.name for t in spec.network_outputs)}, "
            f"modalities {', '.join(sorted(spec.modalities))}, model.onnx sha256 {sha}")


def package_dirs(path_list: str) -> list[Path]:
    """``MOSMEDAI_TOOL_PACKAGES`` entries (os.pathsep separated): a package directory (it
    holds manifest.yaml) or a directory of package directories."""
    import os

    found = []
    for entry in filter(None, (e.strip() for e in path_list.split(os.pathsep))):
        path = Path(entry)
        if (path / MANIFEST).is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(child for child in path.iterdir() if (child / MANIFEST).is_file())
        else:
            raise PackageError([f"MOSMEDAI_TOOL_PACKAGES: {entry}: not a directory"])
    return found
