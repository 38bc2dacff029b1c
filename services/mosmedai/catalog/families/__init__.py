"""Modality families: the tools of each family and how their network outputs become results.

Every tool of the platform belongs to one family module here (``chest_xray``,
``fluorography``, ``mammography``, ``spine_xray``, ``ct_brain``, ``ct_chest``). A family
module exports:

- ``FAMILY``: a :class:`Family` - image or volume input, the shared preprocess model, and
  for volumes the network grid and HU window;
- ``TOOLS``: the family's :class:`~mosmedai.catalog.tools.ToolSpec` entries;
- ``postprocess(spec, outputs, geometry, volume, calibration, threshold) -> ToolOutput``:
  one item's network outputs -> the tool's standard outputs (pure numpy). The Triton
  postprocess step and the held-out evaluation both call it, so a model card's numbers
  come from the code that serves results.

Tensor contract of a tool ``T`` (batch dimension first, Triton style):

    image tools   T in: pixels UINT16 [H,W], params FP32 [8], voi_lut FP32 [L]
                  xr_preprocess -> image FP32 [1,256,256], geometry FP32 [5] (Letterbox)
    volume tools  T in: volume INT16 [D,H,W] (HU on the family grid), geometry FP32 [9]
                  <family>_preprocess -> image FP32 [1,D,H,W]
    T_net         image -> the tool's ``network_outputs`` (FP32)
    T_post        network outputs, geometry (+ volume for volume tools) ->
    T out:        probability FP32 [1] (NaN when the tool estimates no probability),
                  positive BOOL [1], location FP32 [4] (row0, col0, row1, col1 in source
                  pixels; -1 when none), and measurements FP32 [M] when M > 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

IMAGE = "image"
VOLUME = "volume"

#: Location reported when there is none.
NO_LOCATION = np.full(4, -1.0, np.float32)


@dataclass(frozen=True)
class Family:
    name: str  # e.g. "ct_chest"
    kind: str  # IMAGE or VOLUME
    preprocess: str  # Triton model name of the shared preprocess step
    #: volume families: network grid (slices, rows, columns) and the HU window mapped to [0, 1]
    grid: tuple[int, int, int] | None = None
    window: tuple[float, float] | None = None

    def __post_init__(self):
        if self.kind not in (IMAGE, VOLUME):
            raise ValueError(f"family {self.name}: kind must be {IMAGE!r} or {VOLUME!r}, not {self.kind!r}")
        if self.kind == VOLUME and (self.grid is None or self.window is None):
            raise ValueError(f"volume family {self.name} needs a grid and a window")


@dataclass(frozen=True)
class Measurement:
    """One number a tool reports. ``unit`` is UCUM ("mm", "deg", "%", "[hnsf'U]"); a
    category has unit "{category}" and its ``labels`` (value = index into them); a slice
    index of the ordered series has unit "{slice}"."""

    name: str
    unit: str
    description: str = ""
    labels: tuple[str, ...] = ()

    @property
    def is_category(self) -> bool:
        return bool(self.labels)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # without the batch dimension
    data_type: str = "TYPE_FP32"


@dataclass
class ToolOutput:
    """The standard outputs of one tool for one image or series."""

    probability: float  # NaN when the tool estimates none
    positive: bool
    location: np.ndarray = field(default_factory=lambda: NO_LOCATION.copy())  # float32 [4]
    measurements: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # float32 [M]

    def __post_init__(self):
        self.location = np.asarray(self.location, np.float32).reshape(4)
        self.measurements = np.asarray(self.measurements, np.float32).reshape(-1)
        if not (math.isnan(self.probability) or 0.0 <= self.probability <= 1.0):
            raise ValueError(f"probability {self.probability} is not in [0, 1] or NaN")


#: Ensembles of versions after the first are ``<tool>_v<N>``: a name Triton's HTTP paths,
#: gRPC, Prometheus labels and Kubernetes all take as is ('@' or '/' would not be). Tool
#: names may therefore not end in ``_v<digits>`` (mosmedai.catalog.tools refuses them).
VERSION_SUFFIX = "_v"


@dataclass(frozen=True)
class ToolSpec:
    """One AI tool: a Triton ensemble ``<preprocess> -> <name>_net -> <name>_post``.

    Versions side by side: the network and postprocess models hold one Triton version
    folder per tool version (``versions``); each tool version has its own ensemble
    (`ensemble`), which pins those steps to that version. Version 1's ensemble is the
    tool's name, as before versions existed.
    """

    name: str
    family: Family
    title: str
    finding: str  # what a positive result means, for people
    modalities: frozenset[str]
    network_outputs: tuple[TensorSpec, ...]
    measurements: tuple[Measurement, ...] = ()
    has_probability: bool = True
    #: header routing: Body Part Examined, View Position, Image Laterality values the tool
    #: reads, and Series Description keywords as a fallback (upper case)
    body_parts: frozenset[str] = frozenset()
    views: frozenset[str] = frozenset()
    description_keywords: tuple[str, ...] = ()
    #: Series Description keywords that exclude the tool (e.g. fluorography for chest X-ray tools)
    exclude_keywords: tuple[str, ...] = ()
    #: Series Description keywords of which one must be present (e.g. fluorography's "ФЛГ")
    required_keywords: tuple[str, ...] = ()
    #: whether a PA/AP-style view without Body Part Examined is enough to accept
    view_alone_suffices: bool = False
    default_threshold: float = 0.5
    #: the tool versions the model repository holds (Triton version folders of the _net
    #: and _post models), ascending; each has its model card and held-out evaluation
    versions: tuple[int, ...] = (1,)

    def __post_init__(self):
        versions = list(self.versions)
        if not versions or versions[0] != 1 or versions != sorted(set(versions)):
            raise ValueError(f"tool {self.name}: versions must ascend from 1 without repeats, not {versions}")

    def ensemble(self, version: int = 1) -> str:
        """The Triton ensemble of one version: ``<name>`` for 1, ``<name>_v<N>`` for N > 1."""
        if version not in self.versions:
            raise ValueError(f"tool {self.name} has no version {version}; versions: {list(self.versions)}")
        return self.name if version == 1 else f"{self.name}{VERSION_SUFFIX}{version}"

    @property
    def kind(self) -> str:
        return self.family.kind

    @property
    def preprocess_model(self) -> str:
        return self.family.preprocess

    @property
    def network_model(self) -> str:
        return f"{self.name}_net"

    @property
    def postprocess_model(self) -> str:
        return f"{self.name}_post"
