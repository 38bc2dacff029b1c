"""Non-contrast head CT: intracranial haemorrhage, early ischaemia and midline shift.

The gateway samples the axial series onto a 24 x 96 x 96 grid (`mosmedai.catalog.volumes.to_grid`);
the network sees ``window(grid, -20, 100)[None]`` (blood 60-80 HU, brain 30-40 HU and CSF
0-10 HU spread over [0, 1]; bone and air saturate). The network's heatmaps are at half the
grid's in-plane resolution: [24, 48, 48] cells, one cell = 1 grid slice x 2 x 2 grid pixels.

Patient orientation convention: series with Image Orientation (Patient) [1,0,0,0,1,0] (LPS,
the standard axial acquisition) have columns increasing towards the patient's LEFT and rows
towards posterior; in radiological display image right = patient left. ``side`` (haemorrhage)
and ``direction`` (midline shift) are patient sides under that convention: a finding at
larger column indices than the midline is on the patient's left.

Measurements that a negative result does not make (haemorrhage/ischaemia slice, side,
volume, density drop) are NaN; the location is then -1s. Midline shift always measures.
"""

from __future__ import annotations

import math

import numpy as np

from mosmedai.catalog.families import (
    NO_LOCATION,
    VOLUME,
    Family,
    Measurement,
    TensorSpec,
    ToolOutput,
    ToolSpec,
)
from mosmedai.catalog.volumes import VolumeGeometry

GRID = (24, 96, 96)
WINDOW = (-20.0, 100.0)
#: Heatmap cells: all grid slices, half the grid's rows and columns.
HEATMAP_SHAPE = (GRID[0], GRID[1] // 2, GRID[2] // 2)
CELL = (1, GRID[1] // HEATMAP_SHAPE[1], GRID[2] // HEATMAP_SHAPE[2])
#: A midline shift of at least this many mm is a positive result (common clinical cut-off).
SHIFT_POSITIVE_MM = 5.0
#: A haemorrhage whose centroid lies within this distance of the midline is "midline".
MIDLINE_SIDE_MM = 7.0
#: Heatmap cells in the peak's region: probability >= this share of the peak (26-connected).
REGION_FRACTION = 0.5
#: Ischaemia heatmaps are flat (a diffuse drop): their region keeps the cells >= this share of the peak.
ISCHAEMIA_REGION_FRACTION = 0.8
#: HU band counted as acute blood for the haemorrhage volume.
BLOOD_HU = (50.0, 100.0)
#: HU band of brain tissue for the ischaemia density drop.
TISSUE_HU = (10.0, 55.0)
SIDES = ("left", "right", "midline")
DIRECTIONS = ("left", "right")

FAMILY = Family(name="ct_brain", kind=VOLUME, preprocess="ctbrain_preprocess", grid=GRID, window=WINDOW)

DETECTION_OUTPUTS = (TensorSpec("logit", (1,)), TensorSpec("heatmap", (1, *HEATMAP_SHAPE)))
SHIFT_OUTPUTS = (TensorSpec("septum", (1, *HEATMAP_SHAPE)), TensorSpec("midline", (1, *HEATMAP_SHAPE)))

SLICE = Measurement("slice", "{slice}", "index of the key slice in the ordered series (0 = first, feet end)")


#: Operating thresholds = the calibration split's suggested thresholds
#: (model_repository/<tool>_post/1/calibration.json, "suggested_threshold").
def _tool(name: str, title: str, finding: str, outputs, measurements, has_probability: bool = True,
          threshold: float = 0.5) -> ToolSpec:
    return ToolSpec(
        name=name, family=FAMILY, title=title, finding=finding, modalities=frozenset({"CT"}),
        network_outputs=outputs, measurements=measurements, has_probability=has_probability,
        body_parts=frozenset({"HEAD", "BRAIN", "SKULL"}),
        description_keywords=("HEAD", "BRAIN", "ГОЛОВ", "МОЗГ"),
        exclude_keywords=("ANGIO", "PERFUS", "АНГИО", "ПЕРФУЗ"),
        default_threshold=threshold,
    )


TOOLS = (
    _tool(
        "ctb_hemorrhage", "Head CT: intracranial haemorrhage",
        "acute intracranial haemorrhage (hyperdense intraparenchymal or extra-axial blood)",
        DETECTION_OUTPUTS,
        (SLICE,
         Measurement("side", "{category}", "patient side of the haemorrhage (columns increase towards patient left)",
                     labels=SIDES),
         Measurement("volume_ml", "mL", "volume of voxels 50-100 HU in the detected region")),
        threshold=0.22,
    ),
    _tool(
        "ctb_ischemia", "Head CT: early ischaemia",
        "early ischaemic change (territorial hypodensity, loss of grey-white differentiation)",
        DETECTION_OUTPUTS,
        (SLICE,
         Measurement("density_drop", "[hnsf'U]",
                     "mean HU of the mirrored contralateral region minus that of the detected region")),
        threshold=0.23,
    ),
    _tool(
        "ctb_midline_shift", "Head CT: midline shift",
        f"midline shift of at least {SHIFT_POSITIVE_MM:g} mm (septum pellucidum off the falx line)",
        SHIFT_OUTPUTS,
        (Measurement("midline_shift_mm", "mm", "distance of the septum pellucidum from the midline (falx) plane"),
         Measurement("direction", "{category}", "patient side the septum is pushed towards", labels=DIRECTIONS),
         SLICE),
        has_probability=False,
    ),
)


# --------------------------------------------------------------------------------------
# helpers (numpy only)


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _dilate(mask: np.ndarray) -> np.ndarray:
    """26-neighbourhood binary dilation of a 3-D mask."""
    out = mask.copy()
    padded = np.pad(mask, 1)
    d, h, w = mask.shape
    for dz in (0, 1, 2):
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                out |= padded[dz:dz + d, dy:dy + h, dx:dx + w]
    return out


def peak_region(probability: np.ndarray, fraction: float = REGION_FRACTION, level: float | None = None) -> np.ndarray:
    """Cells 26-connected to the peak with probability >= fraction x peak (or >= level)."""
    above = probability >= (fraction * probability.max() if level is None else min(level, probability.max()))
    region = np.zeros_like(above)
    region[np.unravel_index(int(np.argmax(probability)), probability.shape)] = True
    while True:
        grown = _dilate(region) & above
        if grown.sum() == region.sum():
            return region
        region = grown


def skull_midline_col(volume: np.ndarray, slice_: int | None = None) -> float:
    """Column (grid pixel edges) of the skull's symmetry axis: the median over rows of the
    midpoint between the first and last bone (>= 300 HU) pixel, on the middle third of the
    slices holding bone (or on one slice)."""
    bone = np.asarray(volume) >= 300
    slices = [slice_] if slice_ is not None else None
    if slices is None:
        held = np.flatnonzero(bone.any(axis=(1, 2)))
        if len(held) == 0:
            return volume.shape[2] / 2.0
        lo, hi = held[0] + len(held) // 3, held[0] + 2 * len(held) // 3 + 1
        slices = list(range(lo, hi))
    mids = []
    for s in slices:
        rows = np.flatnonzero(bone[s].any(axis=1))
        for r in rows:
            cols = np.flatnonzero(bone[s, r])
            if cols[-1] - cols[0] > volume.shape[2] // 4:
                mids.append((cols[0] + cols[-1] + 1) / 2.0)
    return float(np.median(mids)) if mids else volume.shape[2] / 2.0


def _box_on_slice(region: np.ndarray, key: int, geometry: VolumeGeometry) -> np.ndarray:
    rows, cols = np.nonzero(region[key])
    r0, r1 = rows.min() * CELL[1], (rows.max() + 1) * CELL[1]
    c0, c1 = cols.min() * CELL[2], (cols.max() + 1) * CELL[2]
    _, row0, col0 = geometry.to_source(key, r0, c0)
    _, row1, col1 = geometry.to_source(key, r1, c1)
    return np.array([row0, col0, row1, col1], np.float32)


def _voxels_of(region: np.ndarray) -> np.ndarray:
    """Heatmap cells -> grid voxels."""
    return region.repeat(CELL[0], 0).repeat(CELL[1], 1).repeat(CELL[2], 2)


def _detect(spec: ToolSpec, outputs, geometry: VolumeGeometry, volume, calibration, threshold):
    logit = float(np.asarray(outputs["logit"]).reshape(-1)[0])
    probability = float(sigmoid(float(calibration["a"]) * logit + float(calibration["b"])))
    positive = probability >= threshold
    heat = sigmoid(np.asarray(outputs["heatmap"], np.float32).reshape(HEATMAP_SHAPE))
    region = peak_region(heat, ISCHAEMIA_REGION_FRACTION if spec.name == "ctb_ischemia" else REGION_FRACTION)
    per_slice = (heat * region).sum(axis=(1, 2))
    key = int(np.argmax(per_slice))
    return probability, positive, heat, region, key


def postprocess(spec: ToolSpec, outputs: dict[str, np.ndarray], geometry: np.ndarray,
                volume: np.ndarray | None, calibration: dict, threshold: float) -> ToolOutput:
    """One series' network outputs -> the tool's standard outputs."""
    geo = VolumeGeometry.from_vector(geometry)
    if spec.name == "ctb_midline_shift":
        return _midline_shift(outputs, geo, calibration)
    probability, positive, heat, region, key = _detect(spec, outputs, geo, volume, calibration, threshold)
    n_measurements = len(spec.measurements)
    if not positive:
        return ToolOutput(probability, False, NO_LOCATION.copy(), np.full(n_measurements, np.nan, np.float32))
    location = _box_on_slice(region, key, geo)
    source_slice = float(geo.source_slice_of(key))
    col_mm = geo.grid_spacing_mm[2]
    if spec.name == "ctb_hemorrhage":
        cols = np.nonzero(region)[2]
        weights = heat[region]
        centre_col = float(np.average((cols + 0.5) * CELL[2], weights=weights))
        offset_mm = (centre_col - skull_midline_col(volume)) * col_mm if volume is not None else 0.0
        side = 2 if abs(offset_mm) < MIDLINE_SIDE_MM else (0 if offset_mm > 0 else 1)
        volume_ml = float("nan")
        if volume is not None:
            # the peak's connected cells above 0.25 (at least its region), grown by one cell
            wide = _voxels_of(_dilate(region | peak_region(heat, level=0.25)))
            hu = np.asarray(volume)
            blood = wide & (hu >= BLOOD_HU[0]) & (hu <= BLOOD_HU[1])
            volume_ml = float(blood.sum() * geo.grid_voxel_ml)
        return ToolOutput(probability, True, location, np.array([source_slice, side, volume_ml], np.float32))
    # ischaemia: density drop against the mirrored region across the skull midline. The network
    # sees an asymmetry; when its region is the denser side, the hypodense mirror image is the
    # finding: the box moves across the midline and the drop keeps its sign (>= 0).
    drop = float("nan")
    if volume is not None:
        hu = np.asarray(volume, np.float32)
        voxels = _voxels_of(region)
        mid = skull_midline_col(hu)
        z, r, c = np.nonzero(voxels)
        mirror = np.clip(np.rint(2 * mid - c - 1).astype(int), 0, hu.shape[2] - 1)
        own, other = hu[z, r, c], hu[z, r, mirror]
        keep = (own >= TISSUE_HU[0]) & (own <= TISSUE_HU[1]) & (other >= TISSUE_HU[0]) & (other <= TISSUE_HU[1])
        if keep.any():
            drop = float(other[keep].mean() - own[keep].mean())
            if drop < 0:
                drop = -drop
                rows, cols = np.nonzero(region[key])
                r0, r1 = rows.min() * CELL[1], (rows.max() + 1) * CELL[1]
                c0, c1 = 2 * mid - (cols.max() + 1) * CELL[2], 2 * mid - cols.min() * CELL[2]
                c0, c1 = max(0.0, c0), min(float(geo.grid_cols), c1)
                _, row0, col0 = geo.to_source(key, r0, c0)
                _, row1, col1 = geo.to_source(key, r1, c1)
                location = np.array([row0, col0, row1, col1], np.float32)
    return ToolOutput(probability, True, location, np.array([source_slice, drop], np.float32))


def soft_argmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected (slice, row, col) cell position (cell edges: cell k spans [k, k+1)) under the
    softmax over all cells, and the softmax itself."""
    values = np.asarray(logits, np.float64).reshape(HEATMAP_SHAPE)
    weights = np.exp(values - values.max())
    weights /= weights.sum()
    position = np.array([
        float((weights.sum(axis=(1, 2)) * (np.arange(HEATMAP_SHAPE[0]) + 0.5)).sum()),
        float((weights.sum(axis=(0, 2)) * (np.arange(HEATMAP_SHAPE[1]) + 0.5)).sum()),
        float((weights.sum(axis=(0, 1)) * (np.arange(HEATMAP_SHAPE[2]) + 0.5)).sum()),
    ])
    return position, weights


def _midline_shift(outputs, geo: VolumeGeometry, calibration: dict) -> ToolOutput:
    septum, weights = soft_argmax(outputs["septum"])
    midline, _ = soft_argmax(outputs["midline"])
    shift_cols = (septum[2] - midline[2]) * CELL[2]  # grid columns, + = towards patient left
    # `scale` (fitted on the calibration split) undoes the soft-argmax's pull towards zero
    shift_mm = float(shift_cols * geo.grid_spacing_mm[2]) * float(calibration.get("scale", 1.0))
    key = int(np.clip(math.floor(septum[0] * CELL[0]), 0, geo.grid_slices - 1))
    rows = weights.sum(axis=(0, 2))
    spread = math.sqrt(float((rows * (np.arange(len(rows)) + 0.5 - septum[1]) ** 2).sum()))
    half_rows = max(1.0, 2.0 * spread) * CELL[1]
    c0, c1 = sorted((septum[2] * CELL[2], midline[2] * CELL[2]))
    r0, r1 = septum[1] * CELL[1] - half_rows, septum[1] * CELL[1] + half_rows
    _, row0, col0 = geo.to_source(key, max(0.0, r0), c0 - 0.5)
    _, row1, col1 = geo.to_source(key, min(float(geo.grid_rows), r1), c1 + 0.5)
    location = np.array([row0, col0, row1, col1], np.float32)
    measurements = np.array([abs(shift_mm), 0 if shift_mm > 0 else 1, geo.source_slice_of(key)], np.float32)
    return ToolOutput(float("nan"), abs(shift_mm) >= SHIFT_POSITIVE_MM, location, measurements)
