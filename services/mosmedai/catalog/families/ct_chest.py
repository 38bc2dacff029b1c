"""Chest CT: COVID-19-type involvement, lung nodules, emphysema, coronary calcium, bone density.

The five tools share one network grid (48 x 96 x 96 cells over the whole series) and the
HU window -1100..500. Each tool's network (``<tool>_net``) is the same small multi-task 3-D
CNN (`mosmedai_training.ct_chest.ChestNet`) exported with only that tool's heads; every head
is a map of logits at half the grid (24 x 48 x 48). Wherever the quantity is defined on
Hounsfield units, the network only says *where* (lungs, vertebral bodies, heart, coronary
calcium, a nodule) and the number is computed here from the int16 HU grid volume, which is a
nearest-neighbour sample of the source (unbiased for shares and means of HU):

* ``ctc_covid``: involvement = lesion voxels / lung voxels (network masks), MoH CT-0..CT-4;
* ``ctc_nodule``: calibrated probability from the nodule map's peak; the nodule's voxels
  are the voxels above -500 HU connected to the peak inside the (dilated) nodule mask, giving
  the equivalent-sphere diameter, the key slice and its box;
* ``ctc_emphysema``: LAA-950 = share of lung voxels below -950 HU;
* ``ctc_cac``: Agatston-equivalent score of the >= 130 HU components inside the (dilated)
  heart region that the network marks as coronary calcium;
* ``ctc_bone_density``: mean HU of the vertebral-body mask on slices with a cortical
  outline (not discs), eroded past the cortex.

Pure numpy and cv2 (runs in Triton's Python stub).
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

GRID = (48, 96, 96)
WINDOW = (-1100.0, 500.0)
#: Heads are at half the grid.
HEAD = tuple(n // 2 for n in GRID)

FAMILY = Family(name="ct_chest", kind=VOLUME, preprocess="ctchest_preprocess", grid=GRID, window=WINDOW)

#: Network head channels of the multi-task network, in order.
HEADS = ("lung", "lesion", "nodule", "heart", "calcium", "vertebra")

# --- rules (documented in the model cards) -----------------------------------------------
#: Involvement (% of lung volume) from which a series counts as involved (CT-1 or more).
COVID_POSITIVE_PERCENT = 0.5
COVID_CATEGORIES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
#: Emphysema: LAA-950 at or above this share of the lung volume is reported positive.
EMPHYSEMA_HU = -950.0
EMPHYSEMA_POSITIVE_PERCENT = 6.0
#: Agatston: voxels at or above 130 HU; density weight by the peak HU of a lesion in a slice.
CALCIUM_HU = 130.0
CAC_CATEGORIES = ("0", "1-99", "100-399", ">=400")
#: Opportunistic osteoporosis screening: cancellous vertebral attenuation below 100 HU.
BONE_POSITIVE_HU = 100.0
#: Nodule voxels: above this HU (between aerated lung ~-860 and soft tissue ~+40).
NODULE_HU = -500.0


def _spec(name: str, title: str, finding: str, outputs: tuple[TensorSpec, ...],
          measurements: tuple[Measurement, ...], has_probability: bool = False,
          default_threshold: float = 0.5) -> ToolSpec:
    return ToolSpec(
        name=name, family=FAMILY, title=title, finding=finding,
        modalities=frozenset({"CT"}), network_outputs=outputs, measurements=measurements,
        has_probability=has_probability, default_threshold=default_threshold,
        body_parts=frozenset({"CHEST", "THORAX", "LUNG"}),
        description_keywords=("CHEST", "THORAX", "LUNG", "ГРУД", "ОГК"),
    )


def _head(name: str) -> TensorSpec:
    return TensorSpec(name, (1, *HEAD))


TOOLS = (
    _spec("ctc_covid", "Chest CT: COVID-19 pneumonia involvement (CT-0..CT-4)",
          "ground-glass opacities / consolidation involving the lungs",
          (_head("lung"), _head("lesion")),
          (Measurement("involvement_percent", "%", "share of the lung volume involved"),
           Measurement("ct_category", "{category}", "Russian MoH CT severity scale", COVID_CATEGORIES))),
    _spec("ctc_nodule", "Chest CT: lung nodule", "solid lung nodule",
          (TensorSpec("logit", (1,)), _head("nodule")),
          (Measurement("slice", "{slice}", "source slice (ordered series) through the nodule's largest section"),
           Measurement("diameter_mm", "mm", "equivalent-sphere diameter of the nodule")),
          # 0.5: the Bayes threshold at the calibration split's ~50 % prevalence. The CXR rule
          # (sensitivity >= 0.9 on the calibration split) suggests 0.26, at ~25 % specificity.
          has_probability=True, default_threshold=0.5),
    _spec("ctc_emphysema", "Chest CT: emphysema (LAA-950)", "emphysema: LAA-950 >= 6 % of the lung volume",
          (_head("lung"),),
          (Measurement("laa950_percent", "%", "share of the lung volume below -950 HU"),)),
    _spec("ctc_cac", "Chest CT: coronary artery calcium", "coronary artery calcification (score > 0)",
          (_head("heart"), _head("calcium")),
          (Measurement("calcium_score", "1", "Agatston-equivalent score (scaled to 3 mm slices)"),
           Measurement("cac_category", "{category}", "calcium score category", CAC_CATEGORIES))),
    _spec("ctc_bone_density", "Chest CT: vertebral bone density",
          "low vertebral attenuation (< 100 HU): possible osteoporosis",
          (_head("vertebra"),),
          (Measurement("vertebral_hu", "[hnsf'U]", "mean HU of the cancellous vertebral bodies"),)),
)
TOOL_NAMES = tuple(spec.name for spec in TOOLS)


# --- numpy helpers ---------------------------------------------------------------------


def upsample2(x: np.ndarray) -> np.ndarray:
    """x2 linear upsampling along every axis, as torch's trilinear with align_corners=False."""
    x = np.asarray(x, np.float32)
    for axis in range(x.ndim):
        n = x.shape[axis]
        previous = np.take(x, np.maximum(np.arange(n) - 1, 0), axis=axis)
        following = np.take(x, np.minimum(np.arange(n) + 1, n - 1), axis=axis)
        even = 0.75 * x + 0.25 * previous
        odd = 0.75 * x + 0.25 * following
        x = np.stack([even, odd], axis=axis + 1).reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1:])
    return x


def head_mask(logits: np.ndarray) -> np.ndarray:
    """A head's logits [1, d, h, w] (half grid) -> boolean mask on the grid (logit > 0)."""
    return upsample2(np.asarray(logits, np.float32).reshape(HEAD)) > 0.0


def _shift_max(mask: np.ndarray, axis: int, radius: int, reduce) -> np.ndarray:
    out = mask.copy()
    n = mask.shape[axis]
    for step in range(1, radius + 1):
        if step >= n:
            break
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[axis], hi[axis] = slice(0, n - step), slice(step, n)
        out[tuple(lo)] = reduce(out[tuple(lo)], mask[tuple(hi)])
        out[tuple(hi)] = reduce(out[tuple(hi)], mask[tuple(lo)])
    return out


def dilate(mask: np.ndarray, radii: tuple[int, ...]) -> np.ndarray:
    """Binary dilation by a box of half-sizes ``radii`` (per axis)."""
    for axis, r in enumerate(radii):
        if r > 0:
            mask = _shift_max(mask, axis, r, np.logical_or)
    return mask


def erode(mask: np.ndarray, radii: tuple[int, ...]) -> np.ndarray:
    """Binary erosion by a box of half-sizes ``radii``; outside the array counts as False."""
    padded = np.pad(mask, [(r, r) for r in radii], constant_values=False)
    for axis, r in enumerate(radii):
        if r > 0:
            padded = _shift_max(padded, axis, r, np.logical_and)
    return padded[tuple(slice(r, r + n) for r, n in zip(radii, mask.shape))]


def reconstruct(seed: np.ndarray, allowed: np.ndarray, max_steps: int = 200) -> np.ndarray:
    """Voxels of ``allowed`` 6-connected to ``seed`` (geodesic reconstruction)."""
    current = seed & allowed
    for _ in range(max_steps):
        grown = current.copy()
        for axis in range(current.ndim):
            grown |= _shift_max(current, axis, 1, np.logical_or)
        grown &= allowed
        if np.array_equal(grown, current):
            break
        current = grown
    return current


def covid_category(percent: float) -> int:
    if percent < COVID_POSITIVE_PERCENT:
        return 0
    return 1 + int(np.searchsorted([25.0, 50.0, 75.0], percent, side="right"))


def cac_category(score: float) -> int:
    if score <= 0.0:
        return 0
    return 1 + int(np.searchsorted([100.0, 400.0], score, side="right"))


def agatston_weight(peak_hu: float) -> int:
    """Agatston density factor of a lesion's peak attenuation in one slice."""
    return 0 if peak_hu < CALCIUM_HU else 1 if peak_hu < 200 else 2 if peak_hu < 300 else 3 if peak_hu < 400 else 4


def agatston(hu: np.ndarray, candidate: np.ndarray, pixel_area_mm2: float, slice_spacing_mm: float,
             keep=None, min_area_mm2: float = 1.0) -> float:
    """Agatston-equivalent score: per slice, 8-connected components of ``candidate`` (voxels
    >= 130 HU), each area (mm^2, at least ``min_area_mm2``) x density weight of its peak HU;
    summed and scaled by slice spacing / 3 mm. ``keep(slice, component_mask)`` may veto."""
    import cv2

    total = 0.0
    for k in np.flatnonzero(candidate.reshape(candidate.shape[0], -1).any(axis=1)):
        count, labels = cv2.connectedComponents(candidate[k].astype(np.uint8), connectivity=8)
        for label in range(1, count):
            component = labels == label
            area = float(component.sum()) * pixel_area_mm2
            if area < min_area_mm2 or (keep is not None and not keep(k, component)):
                continue
            total += area * agatston_weight(float(hu[k][component].max()))
    return total * slice_spacing_mm / 3.0


# --- per-tool postprocessing -------------------------------------------------------------


def covid_involvement(outputs: dict[str, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
    lung = head_mask(outputs["lung"])
    lesion = head_mask(outputs["lesion"]) & lung
    n_lung = int(lung.sum())
    percent = 100.0 * float(lesion.sum()) / n_lung if n_lung else 0.0
    return percent, lung, lesion


def laa950(outputs: dict[str, np.ndarray], volume: np.ndarray) -> tuple[float, np.ndarray]:
    lung = head_mask(outputs["lung"])
    n_lung = int(lung.sum())
    percent = 100.0 * float((volume[lung] < EMPHYSEMA_HU).sum()) / n_lung if n_lung else 0.0
    return percent, lung


def calcium_score(outputs: dict[str, np.ndarray], volume: np.ndarray, geometry: VolumeGeometry,
                  calibration: dict) -> float:
    heart = dilate(head_mask(outputs["heart"]), (1, 2, 2))
    calcium_logit = upsample2(np.asarray(outputs["calcium"], np.float32).reshape(HEAD))
    marked = dilate(calcium_logit > float(calibration.get("calcium_logit_threshold", 0.0)), (0, 1, 1))
    candidate = heart & (volume >= CALCIUM_HU)
    dz, dy, dx = geometry.grid_spacing_mm
    return agatston(volume, candidate, dy * dx, dz, keep=lambda k, component: bool((marked[k] & component).any()),
                    min_area_mm2=float(calibration.get("min_area_mm2", 1.0)))


def cancellous_mask(outputs: dict[str, np.ndarray], volume: np.ndarray, geometry: VolumeGeometry,
                    calibration: dict) -> np.ndarray:
    """Cancellous bone of the vertebral bodies, from the network's vertebral-body mask:

    1. slices whose mask outline is not cortical bone (under ``rim_share`` of the outline
       voxels >= ``rim_hu``) are dropped - intervertebral discs (~+80 HU) have no cortex;
    2. the mask is eroded past the cortical rim and endplates (``erode_mm`` in-plane, one
       grid slice in z; less if nothing would be left);
    3. voxels >= ``cortical_hu`` left over (cortex the erosion missed) are dropped.
    """
    body = head_mask(outputs["vertebra"])
    rim_hu = float(calibration.get("rim_hu", 400.0))
    rim_share = float(calibration.get("rim_share", 0.3))
    network_mask = body.copy()
    for k in np.flatnonzero(body.reshape(body.shape[0], -1).any(axis=1)):
        outline = body[k] & ~erode(body[k], (1, 1))
        if outline.any() and float((volume[k][outline] >= rim_hu).mean()) < rim_share:
            body[k] = False
    if not body.any():  # no slice with a cortical outline: keep the network's mask
        body = network_mask
    dz, dy, dx = geometry.grid_spacing_mm
    erode_mm = float(calibration.get("erode_mm", 3.0))
    radii = (1, max(1, math.ceil(erode_mm / dy)), max(1, math.ceil(erode_mm / dx)))
    while True:
        core = erode(body, radii)
        if core.sum() >= 8 or max(radii) == 0:
            break
        radii = tuple(max(0, r - 1) for r in radii)
    return core & (volume < float(calibration.get("cortical_hu", 500.0)))


def nodule_region(outputs: dict[str, np.ndarray], volume: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The nodule's voxels: above NODULE_HU, inside the dilated nodule mask, connected to the peak."""
    logits = upsample2(np.asarray(outputs["nodule"], np.float32).reshape(HEAD))
    peak = np.unravel_index(int(np.argmax(logits)), logits.shape)
    allowed = dilate(logits > 0.0, (1, 1, 1)) & (volume > NODULE_HU)
    # A crop around the peak keeps the flood fill cheap (a nodule is < 1/3 of the grid).
    lo = [max(0, p - n // 3) for p, n in zip(peak, GRID)]
    hi = [min(n, p + n // 3 + 1) for p, n in zip(peak, GRID)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    allowed_crop = allowed[crop]
    seed = np.zeros_like(allowed_crop)
    local = tuple(p - a for p, a in zip(peak, lo))
    if allowed_crop[local]:
        seed[local] = True
    else:  # the peak fell on a dark voxel: start from the brightest allowed voxel near it
        near = np.zeros_like(allowed_crop)
        near[tuple(slice(max(0, c - 2), c + 3) for c in local)] = True
        near &= allowed_crop
        if near.any():
            values = np.where(near, volume[crop], -32768)
            seed[np.unravel_index(int(np.argmax(values)), values.shape)] = True
    region = np.zeros(GRID, bool)
    region[crop] = reconstruct(seed, allowed_crop)
    return region, peak


def postprocess(spec: ToolSpec, outputs: dict[str, np.ndarray], geometry: np.ndarray,
                volume: np.ndarray | None, calibration: dict, threshold: float) -> ToolOutput:
    geo = VolumeGeometry.from_vector(geometry)
    volume = np.asarray(volume).reshape(GRID)
    name = spec.name
    if name == "ctc_covid":
        percent, _, _ = covid_involvement(outputs)
        category = covid_category(percent)
        return ToolOutput(math.nan, category > 0, NO_LOCATION, [percent, category])
    if name == "ctc_emphysema":
        percent, _ = laa950(outputs, volume)
        return ToolOutput(math.nan, percent >= EMPHYSEMA_POSITIVE_PERCENT, NO_LOCATION, [percent])
    if name == "ctc_cac":
        score = calcium_score(outputs, volume, geo, calibration)
        return ToolOutput(math.nan, score > 0.0, NO_LOCATION, [score, cac_category(score)])
    if name == "ctc_bone_density":
        core = cancellous_mask(outputs, volume, geo, calibration)
        mean = float(volume[core].mean()) if core.any() else math.nan
        return ToolOutput(math.nan, bool(mean < BONE_POSITIVE_HU), NO_LOCATION, [mean])
    if name == "ctc_nodule":
        from mosmedai.catalog.postprocess import Calibration, calibrated_probability

        logit = np.asarray(outputs["logit"], np.float32).reshape(1)
        probability = float(calibrated_probability(
            logit, Calibration(float(calibration["a"]), float(calibration["b"])))[0])
        if probability < threshold:
            return ToolOutput(probability, False, NO_LOCATION, [-1.0, math.nan])
        region, peak = nodule_region(outputs, volume)
        if not region.any():
            return ToolOutput(probability, True, NO_LOCATION, [geo.source_slice_of(peak[0]), math.nan])
        diameter = (6.0 * float(region.sum()) * geo.grid_voxel_ml * 1000.0 / math.pi) ** (1.0 / 3.0)
        areas = region.sum(axis=(1, 2))
        key = int(np.argmax(areas))
        rows = np.flatnonzero(region[key].any(axis=1))
        cols = np.flatnonzero(region[key].any(axis=0))
        r0, c0 = geo.to_source(key, rows[0], cols[0])[1:]
        r1, c1 = geo.to_source(key, rows[-1] + 1, cols[-1] + 1)[1:]
        return ToolOutput(probability, True, [r0, c0, r1, c1], [geo.source_slice_of(key), diameter])
    raise ValueError(f"{name} is not a ct_chest tool")
