"""Network outputs -> calibrated probability, decision and location (pure numpy).

Shared by the Triton postprocess models and by the held-out evaluation, so the numbers in a
model card come from the same code that serves results.

A chest X-ray network gives, per image, a ``logit`` [1] and a ``heatmap`` [1, 32, 32] of
logits over the 256 x 256 network input (one cell = 8 x 8 network pixels). The letterbox
geometry (`mosmedai.catalog.imaging.Letterbox`) maps network pixels back to source pixels.

Coordinates are pixel edges: source pixel (i, j) spans [i, i + 1) x [j, j + 1); a location
(row0, col0, row1, col1) is a box in those coordinates, clipped to [0, rows] x [0, columns].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mosmedai.catalog.imaging import NETWORK_SIZE, Letterbox

#: Location reported when the finding is not positive.
NO_LOCATION = np.full(4, -1.0, np.float32)

#: A heatmap cell belongs to the peak's region when its probability is at least this share
#: of the peak's probability (and it touches the peak's region, 8-connected).
REGION_FRACTION = 0.5


@dataclass(frozen=True)
class Calibration:
    """Platt scaling fitted on a calibration split: p = sigmoid(a * logit + b)."""

    a: float
    b: float

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        data = json.loads(Path(path).read_text())
        calibration = cls(float(data["a"]), float(data["b"]))
        if not (math.isfinite(calibration.a) and math.isfinite(calibration.b)):
            raise ValueError(f"{path}: calibration a={calibration.a}, b={calibration.b} is not finite")
        return calibration


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow for large |x|."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    e = np.exp(x[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def calibrated_probability(logit: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Platt-scaled probability of the finding, float32, same shape as `logit`."""
    logit = np.asarray(logit, np.float64)
    return sigmoid(calibration.a * logit + calibration.b).astype(np.float32)


def _as_letterbox(geometry: Letterbox | np.ndarray) -> Letterbox:
    return geometry if isinstance(geometry, Letterbox) else Letterbox.from_vector(np.asarray(geometry).reshape(-1))


def _peak_region(probability: np.ndarray) -> np.ndarray:
    """Cells 8-connected to the peak with probability >= REGION_FRACTION x peak."""
    rows, cols = probability.shape
    peak = np.unravel_index(int(np.argmax(probability)), probability.shape)
    above = probability >= REGION_FRACTION * probability[peak]
    region = np.zeros_like(above)
    region[peak] = True
    stack = [peak]
    while stack:  # at most 32 x 32 cells: a plain flood fill is fast enough
        r, c = stack.pop()
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if 0 <= rr < rows and 0 <= cc < cols and above[rr, cc] and not region[rr, cc]:
                    region[rr, cc] = True
                    stack.append((rr, cc))
    return region


def locate(
    heatmap: np.ndarray,
    geometry: Letterbox | np.ndarray,
    from_logits: bool | None = None,
    network_size: int = NETWORK_SIZE,
) -> np.ndarray:
    """The box of the heatmap's peak region in source pixels: float32 (row0, col0, row1, col1).

    heatmap: [32, 32] (or [1, 32, 32]) logits or probabilities over the network input;
    `from_logits` None decides by the values (any outside [0, 1] means logits).
    The box spans the cells of the peak's region (cells >= half the peak probability,
    connected to it), centred on the region's probability-weighted centroid so a finding
    between two cells is placed between them; it is clipped to the image.
    """
    values = np.asarray(heatmap, np.float64)
    values = values.reshape(values.shape[-2:])
    if from_logits is None:
        from_logits = bool(values.min() < 0.0 or values.max() > 1.0)
    probability = sigmoid(values) if from_logits else values
    geometry = _as_letterbox(geometry)
    cell_rows = network_size / probability.shape[0]
    cell_cols = network_size / probability.shape[1]

    region = _peak_region(probability)
    rows, cols = np.nonzero(region)
    weights = probability[rows, cols] - REGION_FRACTION * probability.max() + 1e-9
    centre_r = float(np.average(rows + 0.5, weights=weights)) * cell_rows
    centre_c = float(np.average(cols + 0.5, weights=weights)) * cell_cols
    half_h = (rows.max() - rows.min() + 1) * cell_rows / 2.0
    half_w = (cols.max() - cols.min() + 1) * cell_cols / 2.0

    row0, col0 = geometry.to_source(centre_r - half_h, centre_c - half_w)
    row1, col1 = geometry.to_source(centre_r + half_h, centre_c + half_w)
    box = np.array(
        [
            np.clip(row0, 0.0, geometry.height),
            np.clip(col0, 0.0, geometry.width),
            np.clip(row1, 0.0, geometry.height),
            np.clip(col1, 0.0, geometry.width),
        ],
        np.float32,
    )
    return box


def postprocess(
    logit: np.ndarray,
    heatmap: np.ndarray,
    geometry_vector: np.ndarray,
    calibration: Calibration,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's network outputs -> probability float32 [1], positive bool [1], location float32 [4].

    positive is probability >= threshold; location is [-1, -1, -1, -1] when not positive.
    """
    logit = np.asarray(logit, np.float32).reshape(-1)[:1]
    probability = calibrated_probability(logit, calibration).reshape(1)
    positive = probability >= np.float32(threshold)
    location = locate(heatmap, geometry_vector) if bool(positive[0]) else NO_LOCATION.copy()
    return probability, positive.astype(bool), location
