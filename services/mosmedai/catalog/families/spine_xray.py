"""Spine X-ray: Cobb angle and scoliosis grade on frontal (AP/PA) whole-spine radiographs.

The network reads the 256 x 256 letterboxed radiograph and gives two maps at 1/8 resolution
(32 x 32 cells of 8 x 8 input pixels):

- ``spine`` [1, 32, 32]: logits that a cell lies on a vertebral body;
- ``tilt`` [1, 32, 32]: the end-plate tilt of the vertebra under each cell, in units of
  TILT_SCALE_DEG degrees (positive: the end plate rises towards the image's right, i.e.
  clockwise on screen; the spine's axis leans the same way).

The postprocess (pure numpy) reads a tilt per cell row along the spine (spine-probability
weighted), smooths it over three rows, and takes the largest difference between rows as the
raw Cobb angle - the angle between the most tilted end plates above and below the curve's
apex. A linear correction fitted on the calibration split (``calibration.json`` "a", "b")
gives the reported Cobb angle in degrees. The letterbox scales rows and columns by the same
factor, so angles on the network input equal angles in source pixel space; those equal
angles on the patient only for square pixels (PixelSpacing row = column), which is assumed.

Grade (Chaklin), on the reported Cobb angle c in degrees, cut points exact:
  "0": c < 1;  "I": 1 <= c <= 10;  "II": 10 < c <= 25;  "III": 25 < c <= 50;  "IV": c > 50.
Positive (scoliosis by the SRS definition): c >= 10. The tool estimates no probability.
Location: the box of the curve between its end vertebrae (the rows of the largest and the
smallest tilt), in source pixels; -1s when not positive.
"""

from __future__ import annotations

import math

import numpy as np

from mosmedai.catalog.families import (
    IMAGE,
    NO_LOCATION,
    Family,
    Measurement,
    TensorSpec,
    ToolOutput,
    ToolSpec,
)
from mosmedai.catalog.families.chest_xray import PROJECTION_RADIOGRAPHY
from mosmedai.catalog.imaging import NETWORK_SIZE, Letterbox

FAMILY = Family(name="spine_xray", kind=IMAGE, preprocess="xr_preprocess")

MAP_SIZE = NETWORK_SIZE // 8
TILT_SCALE_DEG = 30.0
NETWORK_OUTPUTS = (TensorSpec("spine", (1, MAP_SIZE, MAP_SIZE)), TensorSpec("tilt", (1, MAP_SIZE, MAP_SIZE)))

GRADES = ("0", "I", "II", "III", "IV")
#: Upper bounds (inclusive) of grades 0..III; above the last: IV. Grade 0 is c < 1 (exclusive).
GRADE_BOUNDS_DEG = (1.0, 10.0, 25.0, 50.0)
#: SRS: scoliosis is a Cobb angle of 10 degrees or more.
POSITIVE_COBB_DEG = 10.0
#: A cell row belongs to the spine when its most likely cell has at least this probability.
ROW_PROBABILITY = 0.5

MEASUREMENTS = (
    Measurement("cobb_angle", "deg", "largest angle between vertebral end plates (Cobb), source pixel space"),
    Measurement("scoliosis_grade", "{category}",
                "Chaklin grade: 0 (< 1 deg), I (1-10), II (>10-25), III (>25-50), IV (> 50)", labels=GRADES),
)

TOOLS = (
    ToolSpec(
        name="spine_scoliosis", family=FAMILY, title="Spine X-ray: scoliosis (Cobb angle)",
        finding="scoliosis: Cobb angle >= 10 degrees",
        modalities=PROJECTION_RADIOGRAPHY, network_outputs=NETWORK_OUTPUTS, measurements=MEASUREMENTS,
        has_probability=False,
        body_parts=frozenset({"SPINE", "TSPINE", "LSPINE", "CSPINE", "WHOLESPINE", "WHOLEBODY"}),
        views=frozenset({"AP", "PA"}), view_alone_suffices=False,
        description_keywords=("SPINE", "SCOLIO", "ПОЗВОН", "СКОЛИОЗ"),
    ),
)


def grade_of(cobb_deg: float) -> int:
    """Chaklin grade index into GRADES for a Cobb angle in degrees (cut points in the module doc)."""
    if not math.isfinite(cobb_deg) or cobb_deg < GRADE_BOUNDS_DEG[0]:
        return 0
    for index, bound in enumerate(GRADE_BOUNDS_DEG[1:], start=1):
        if cobb_deg <= bound:
            return index
    return len(GRADES) - 1


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def row_tilts(spine_logits: np.ndarray, tilt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell row along the spine: the row indices, their tilt (degrees, smoothed over three
    rows) and the spine's centre column (cells), rows in top-to-bottom order."""
    p = _sigmoid(np.asarray(spine_logits, np.float64).reshape(MAP_SIZE, MAP_SIZE))
    t = np.asarray(tilt, np.float64).reshape(MAP_SIZE, MAP_SIZE) * TILT_SCALE_DEG
    rows = np.flatnonzero(p.max(axis=1) >= ROW_PROBABILITY)
    if rows.size == 0:
        return rows, np.zeros(0), np.zeros(0)
    weights = np.where(p[rows] >= 0.5 * p[rows].max(axis=1, keepdims=True), p[rows], 0.0)
    values = (weights * t[rows]).sum(axis=1) / weights.sum(axis=1)
    centres = (weights * (np.arange(MAP_SIZE) + 0.5)).sum(axis=1) / weights.sum(axis=1)
    if values.size >= 3:
        padded = np.concatenate([values[:1], values, values[-1:]])
        values = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    return rows, values, centres


def postprocess(spec: ToolSpec, outputs: dict[str, np.ndarray], geometry: np.ndarray,
                volume: np.ndarray | None, calibration: dict, threshold: float) -> ToolOutput:
    """Cobb angle (deg) and Chaklin grade from the spine and tilt maps; box of the curve."""
    rows, values, centres = row_tilts(outputs["spine"], outputs["tilt"])
    if rows.size < 3:  # no spine found: nothing measured
        return ToolOutput(math.nan, False, NO_LOCATION.copy(), np.array([math.nan, math.nan], np.float32))
    top, bottom = int(np.argmax(values)), int(np.argmin(values))
    raw = float(values[top] - values[bottom])
    cobb = max(0.0, float(calibration.get("a", 1.0)) * raw + float(calibration.get("b", 0.0)))
    positive = cobb >= POSITIVE_COBB_DEG
    location = NO_LOCATION.copy()
    if positive:
        first, last = sorted((top, bottom))
        span = slice(first, last + 1)
        letterbox = Letterbox.from_vector(np.asarray(geometry, np.float32).reshape(-1))
        cell = NETWORK_SIZE / MAP_SIZE
        p = _sigmoid(np.asarray(outputs["spine"], np.float64).reshape(MAP_SIZE, MAP_SIZE))
        half_width = max(1.0, float(np.mean((p[rows[span]] >= 0.5).sum(axis=1))) / 2.0)
        row0, col0 = letterbox.to_source(rows[first] * cell, (centres[span].min() - half_width) * cell)
        row1, col1 = letterbox.to_source((rows[last] + 1) * cell, (centres[span].max() + half_width) * cell)
        location = np.array([np.clip(row0, 0, letterbox.height), np.clip(col0, 0, letterbox.width),
                             np.clip(row1, 0, letterbox.height), np.clip(col1, 0, letterbox.width)], np.float32)
    return ToolOutput(math.nan, bool(positive), location, np.array([cobb, grade_of(cobb)], np.float32))
