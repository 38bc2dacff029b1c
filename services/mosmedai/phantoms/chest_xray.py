"""Synthetic chest radiographs (PA view) with known ground truth.

A phantom is drawn as a display image (1 = bright: bone, heart; 0 = dark: air) from an
anatomy-like model in millimetres - body outline, two lung fields, mediastinum, heart,
spine, posterior and anterior ribs, clavicles, diaphragm domes, vessel trees from the hila -
plus, where asked, the findings of the three chest X-ray tools at known places:

* ``cxr_opacity``: a diffuse bright blob (consolidation) 30-100 mm across inside a lung;
* ``cxr_nodule``: a round bright spot 5-30 mm across inside a lung;
* ``cxr_pneumothorax``: the lung of one side collapsed towards its lower medial corner, so a
  dark crescent without lung markings lies along the apex and lateral chest wall, bounded by
  a thin visceral pleural line.

The display image is then turned into DICOM *stored values* the way modalities vary them, so
training and tests run the real grayscale chain (`mosmedai.catalog.imaging.preprocess`): Bits Stored
10-16, sometimes a Rescale Slope/Intercept, sometimes MONOCHROME1 (stored values inverted),
sometimes a LINEAR window in the header and otherwise none (the percentile window), random
size and aspect, sometimes collimator borders and a burnt-in side marker.

Everything is deterministic from the seed (`numpy.random.default_rng`). A seed may be an int
or a tuple of ints; `generate(seed, n)` uses the seeds ``(seed, 0) ... (seed, n - 1)``, so
sets made from different integer seeds never share a sample.

These are reference phantoms for training and testing software; they are not a model of
disease prevalence or of any real population.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from mosmedai.catalog.imaging import NETWORK_SIZE, GrayscaleParams, Letterbox, VoiFunction, preprocess
from mosmedai.phantoms.common import apply_overrides, map_items, stack_columns

TOOLS = ("cxr_opacity", "cxr_nodule", "cxr_pneumothorax")

#: Long side, pixels, above which the anatomy is drawn at this size and then upsampled
#: (noise is added at full size). The networks see 256 pixels, so finer drawing only costs time.
RENDER_MAX = 1024

#: Heatmap side of the networks (1/8 of the 256-pixel input).
HEATMAP_SIZE = 32

Seed = int | Sequence[int]
Box = tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic radiograph as a modality would store it, with its ground truth.

    ``boxes[tool]`` is (row0, col0, row1, col1) in source pixels, end exclusive (pixel edges:
    pixel i spans [i, i + 1)), or None when the finding is absent. ``masks[tool]`` is the
    finding's pixel mask (bool, the image's shape) or None.
    """

    stored: np.ndarray  # uint16 [rows, columns], stored values
    params: GrayscaleParams
    pixel_spacing_mm: float
    bits_stored: int
    labels: dict[str, bool]
    boxes: dict[str, Box | None]
    masks: dict[str, np.ndarray | None] = field(repr=False)
    seed: Seed = 0
    sizes_mm: dict[str, float] = field(default_factory=dict)  # diameter or depth of each finding

    @property
    def shape(self) -> tuple[int, int]:
        return self.stored.shape  # type: ignore[return-value]

    @property
    def photometric_interpretation(self) -> str:
        return "MONOCHROME1" if self.params.invert else "MONOCHROME2"


# --------------------------------------------------------------------------------------
# small helpers


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px < 0.3:
        return image
    if sigma_px > 6.0:  # wide blurs on a smaller copy: same result to the eye, 10-50x faster
        factor = int(sigma_px // 3)
        rows, cols = image.shape
        small = cv2.resize(image, (max(1, cols // factor), max(1, rows // factor)), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma_px / factor, borderType=cv2.BORDER_REPLICATE)
        return cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(image, (0, 0), sigmaX=float(sigma_px), borderType=cv2.BORDER_REPLICATE)


def _bbox(mask: np.ndarray) -> Box | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _pick_point(rng: np.random.Generator, mask: np.ndarray, min_distance_px: float) -> tuple[int, int] | None:
    """A random pixel of `mask` at least `min_distance_px` from the mask's edge."""
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    candidates = np.flatnonzero(distance.ravel() >= min_distance_px)
    if candidates.size == 0:
        candidates = np.flatnonzero(distance.ravel() >= distance.max() * 0.8)
        if candidates.size == 0:
            return None
    index = int(candidates[rng.integers(candidates.size)])
    return divmod(index, mask.shape[1])


# --------------------------------------------------------------------------------------
# anatomy


@dataclass
class _Lung:
    side: int  # -1: image left (patient right), +1: image right (patient left)
    medial: float  # units of the lung height
    lateral: float
    cap: float  # height of the rounded apex
    base: float  # costophrenic angle, v
    dome: float  # dome height above the costophrenic angle


def _lung_mask(au: np.ndarray, v: np.ndarray, lung: _Lung) -> np.ndarray:
    """Inside one lung field; `au` is the lateral coordinate of that side (|u|), v downwards."""
    m, lat, cap = lung.medial, lung.lateral, lung.cap
    lat_v = lat * (1.0 + 0.06 * np.clip(v - cap, 0.0, None))
    centre, half = (m + lat) / 2.0, (lat - m) / 2.0
    in_cap = ((au - centre) / half) ** 2 + ((v - cap) / cap) ** 2 <= 1.0
    in_body = (v >= cap) & (au >= m) & (au <= lat_v)
    dome_peak = m + 0.4 * (lat - m)
    t = np.where(au > dome_peak, (au - dome_peak) / (lat_v - dome_peak), 0.6 * (dome_peak - au) / (dome_peak - m))
    floor = lung.base - lung.dome * (1.0 - np.clip(t, 0.0, 1.2) ** 2)
    return (in_cap | in_body) & (v <= floor) & (v >= 0.0)


def _diaphragm(au: np.ndarray, lung: _Lung) -> np.ndarray:
    """v of the diaphragm under one lung (for the brighter abdomen below it)."""
    m, lat = lung.medial, lung.lateral * 1.05
    dome_peak = m + 0.4 * (lat - m)
    t = np.where(au > dome_peak, (au - dome_peak) / (lat - dome_peak), 0.6 * np.abs(dome_peak - au) / (dome_peak - m))
    return lung.base - lung.dome * (1.0 - np.clip(t, 0.0, 1.2) ** 2)


def _rib_bands(phase: np.ndarray, count: int, thickness_fraction: np.ndarray | float) -> np.ndarray:
    """Bands of bone along iso-lines of `phase` (one rib per unit), cortex brighter."""
    k = np.rint(phase)
    offset = np.abs(phase - k) / (np.asarray(thickness_fraction) / 2.0)
    inside = (offset < 1.0) & (k >= 0) & (k < count)
    return np.where(inside, 0.65 + 0.35 * offset**4, 0.0).astype(np.float32)


def _vessel_layer(
    rng: np.random.Generator,
    shape: tuple[int, int],
    hilum: tuple[float, float],
    side: int,
    lung: np.ndarray,
    spacing: float,
) -> np.ndarray:
    """Branching lung vessels from a hilum (row, col in pixels), intensity in [0, 1]."""
    layer = np.zeros(shape, np.uint8)
    rows, cols = shape
    trunks = int(rng.integers(7, 11))
    angles = np.linspace(-1.75, 1.45, trunks) + rng.normal(0.0, 0.12, trunks)
    stack = []
    for angle in angles:
        if side < 0:  # mirror: lateral is towards column 0
            angle = np.pi - angle
        stack.append((hilum, float(angle), rng.uniform(2.5, 4.0), 1.0, 0))
    while stack:
        (r, c), angle, width, strength, depth = stack.pop()
        length = rng.uniform(8.0, 18.0) / spacing
        er, ec = r + np.sin(angle) * length, c + np.cos(angle) * length
        cv2.line(
            layer,
            (int(round(c)), int(round(r))),
            (int(round(ec)), int(round(er))),
            int(255 * strength),
            thickness=max(1, int(round(width / spacing))),
        )
        ir, ic = int(er), int(ec)
        if not (0 <= ir < rows and 0 <= ic < cols and lung[ir, ic]) or depth >= 11 or width < 0.5:
            continue
        if rng.random() < 0.6:
            spread = rng.uniform(0.25, 0.55)
            for sign in (-1.0, 1.0):
                stack.append(((er, ec), angle + sign * spread * rng.uniform(0.6, 1.0), width * 0.72, strength * 0.88, depth + 1))
        else:
            stack.append(((er, ec), angle + rng.normal(0.0, 0.25), width * 0.85, strength * 0.92, depth + 1))
    return layer.astype(np.float32) / 255.0


# --------------------------------------------------------------------------------------
# the phantom


def _draw(
    rng: np.random.Generator,
    rng_find: np.random.Generator,
    shape: tuple[int, int],
    spacing: float,
    present: dict[str, bool],
) -> tuple[np.ndarray, dict[str, np.ndarray | None], dict[str, float], np.ndarray]:
    """Display image in [0, 1] (before noise), finding masks, finding sizes, and a mask of the
    patient (for the header's window)."""
    rows, cols = shape
    height_mm, width_mm = rows * spacing, cols * spacing

    # Scale: lung height (apex to costophrenic angle) in mm, fitted into the field of view.
    lateral = rng.uniform(0.46, 0.56)
    scale = min(rng.uniform(215.0, 285.0), 0.74 * height_mm, 0.88 * width_mm / (2 * lateral * 1.1))
    centre_x = width_mm / 2.0 + rng.normal(0.0, 0.025) * width_mm
    slack = height_mm - 1.08 * scale
    apex_y = rng.uniform(0.25, 0.7) * slack

    y = (np.arange(rows, dtype=np.float32) + 0.5) * spacing
    x = (np.arange(cols, dtype=np.float32) + 0.5) * spacing
    v = ((y - apex_y) / scale)[:, None] * np.ones((1, cols), np.float32)
    u = ((x - centre_x) / scale)[None, :] * np.ones((rows, 1), np.float32)
    au = np.abs(u)

    lungs = {
        side: _Lung(
            side=side,
            medial=rng.uniform(0.075, 0.11),
            lateral=lateral + rng.normal(0.0, 0.015),
            cap=rng.uniform(0.17, 0.27),
            base=rng.uniform(0.96, 1.04) + (0.05 if side > 0 else 0.0),
            dome=rng.uniform(0.14, 0.24),
        )
        for side in (-1, 1)
    }
    side_of = np.where(u < 0, -1, 1)
    lung_masks = {side: _lung_mask(au, v, lung) & (side_of == side) for side, lung in lungs.items()}

    # Heart: an ellipsoid's projected thickness, shifted to the patient's left (image right).
    heart_u, heart_v = rng.uniform(0.04, 0.11), rng.uniform(0.68, 0.78)
    heart_a, heart_b = rng.uniform(0.24, 0.32), rng.uniform(0.16, 0.22)
    q = ((u - heart_u) / heart_a) ** 2 + ((v - heart_v) / heart_b) ** 2
    heart = np.sqrt(np.clip(1.0 - q, 0.0, 1.0))
    heart_mask = q < 0.9

    # Aerated lung: where the phantom's lung can carry markings and findings.
    aerated = {side: mask.copy() for side, mask in lung_masks.items()}
    masks: dict[str, np.ndarray | None] = {tool: None for tool in TOOLS}
    sizes: dict[str, float] = {}
    ptx_side = 0
    ptx_line = None
    ptx_region_soft = None
    if present["cxr_pneumothorax"]:
        ptx_side = int(rng_find.choice([-1, 1]))
        lung = lungs[ptx_side]
        factor = rng_find.uniform(0.7, 0.92)  # vertical: the lung falls away from the apex
        factor_u = 1.0 - (1.0 - factor) * rng_find.uniform(0.15, 0.5)  # and less from the side wall
        anchor_u = lung.medial + rng_find.uniform(0.05, 0.2)
        anchor_v = lung.base - rng_find.uniform(0.0, 0.1)
        su = anchor_u + (au - anchor_u) / factor_u
        sv = anchor_v + (v - anchor_v) / factor
        shrunk = _lung_mask(su, sv, lung) & lung_masks[ptx_side]
        region = lung_masks[ptx_side] & ~shrunk
        k = max(1, int(round(2.5 / spacing)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
        region = cv2.morphologyEx(region.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
        aerated[ptx_side] = shrunk
        line_px = max(1, int(round(rng_find.uniform(0.8, 2.0) / spacing)))
        line_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (line_px + 1, line_px + 1))
        edge = cv2.morphologyEx(shrunk.astype(np.uint8), cv2.MORPH_GRADIENT, line_kernel).astype(bool)
        inner = cv2.erode(lung_masks[ptx_side].astype(np.uint8), kernel).astype(bool)
        ptx_line = (edge & inner).astype(np.float32)
        ptx_region_soft = _blur(region.astype(np.float32), 0.8 / spacing)
        masks["cxr_pneumothorax"] = region
        # Depth at the apex: how far the visceral pleura moved from the chest wall.
        sizes["cxr_pneumothorax"] = float((1.0 - factor) * anchor_v * scale)

    lung_any = lung_masks[-1] | lung_masks[1]
    aerated_any = aerated[-1] | aerated[1]

    # ---- body and soft tissue
    background = rng.uniform(0.02, 0.08)
    body_half = lateral + rng.uniform(0.12, 0.2)
    neck_half = rng.uniform(0.2, 0.28)
    half_width = neck_half + (body_half - neck_half) * _smoothstep((v + 0.32) / 0.3)
    thickness = np.sqrt(np.clip(1.0 - (u / half_width) ** 2, 0.0, 1.0))
    body = thickness > 0
    soft = rng.uniform(0.42, 0.58)
    image = background + (soft - background) * np.clip(thickness / 0.25, 0.0, 1.0) * (0.8 + 0.2 * thickness)

    # ---- abdomen below the domes, mediastinum, spine, hila
    for side, lung in lungs.items():
        below = (v > _diaphragm(au, lung)) & (side_of == side)
        image += rng.uniform(0.06, 0.12) * _blur(below.astype(np.float32), 4.0 / spacing) * thickness
    image += rng.uniform(0.08, 0.14) * np.exp(-((u / 0.11) ** 2)) * _smoothstep((v + 0.3) / 0.3)
    spine_half = rng.uniform(0.045, 0.06)
    period = rng.uniform(0.085, 0.1)
    vertebrae = 0.8 + 0.2 * np.cos(2.0 * np.pi * (v - rng.uniform(0, period)) / period)
    image += rng.uniform(0.05, 0.1) * _smoothstep((spine_half - au) / 0.012 + 0.5) * vertebrae
    image += rng.uniform(0.12, 0.2) * heart
    knob_q = ((u - rng.uniform(0.08, 0.12)) / 0.06) ** 2 + ((v - rng.uniform(0.26, 0.32)) / 0.05) ** 2
    image += rng.uniform(0.05, 0.1) * np.sqrt(np.clip(1.0 - knob_q, 0.0, 1.0))

    # ---- lungs: darker in the middle of each field, soft edges
    lung_f = lung_any.astype(np.float32)
    lung_soft = 0.6 * _blur(lung_f, 2.0 / spacing) + 0.4 * _blur(lung_f, 14.0 / spacing) * lung_f
    image -= rng.uniform(0.25, 0.34) * lung_soft * (1.0 - 0.25 * heart)
    image += 0.05 * np.clip(v, 0.0, 1.0) * lung_soft  # bases: more soft tissue in front
    hilum_v = rng.uniform(0.4, 0.5)
    for side in (-1, 1):
        hu = side * rng.uniform(0.15, 0.2)
        image += rng.uniform(0.04, 0.08) * np.exp(-(((u - hu) / 0.06) ** 2 + ((v - hilum_v) / 0.08) ** 2))

    # Breast shadows (sometimes): soft, over the lower lateral lung fields.
    if rng.random() < 0.3:
        amp = rng.uniform(0.03, 0.07)
        for side in (-1, 1):
            bq = ((u - side * rng.uniform(0.3, 0.4)) / 0.26) ** 2 + ((v - rng.uniform(0.85, 0.95)) / 0.2) ** 2
            image += amp * np.sqrt(np.clip(1.0 - bq, 0.0, 1.0))

    # ---- lung markings: vessels and fine texture, only in aerated lung
    markings = np.zeros(shape, np.float32)
    for side in (-1, 1):
        hilum_px = (
            (apex_y + hilum_v * scale) / spacing,
            (centre_x + side * (lungs[side].medial + 0.07) * scale) / spacing,
        )
        markings = np.maximum(markings, _vessel_layer(rng, shape, hilum_px, side, lung_masks[side], spacing))
    markings = _blur(markings, 0.5 / spacing)
    aerated_soft = _blur(aerated_any.astype(np.float32), 1.0 / spacing)
    noise = rng.standard_normal(shape, dtype=np.float32)
    texture = _blur(noise, 2.0 / spacing) - _blur(noise, 6.0 / spacing)
    texture /= max(float(texture.std()), 1e-6)
    image += aerated_soft * (rng.uniform(0.04, 0.08) * markings + rng.uniform(0.008, 0.02) * texture)

    # ---- bones: posterior ribs, anterior ribs, clavicles
    count = 10
    spacing_ribs = rng.uniform(0.085, 0.1)
    start = rng.uniform(-0.08, -0.02)
    in_chest = body & (au > 0.03) & (au < half_width - 0.02)
    bend = rng.uniform(0.7, 1.0)
    posterior = _rib_bands((v - start + 0.15 * au - bend * au**2) / spacing_ribs, count, rng.uniform(0.3, 0.4) * (1 + 0.3 * au))
    image += rng.uniform(0.04, 0.08) * posterior * in_chest
    anterior_start = rng.uniform(0.05, 0.12)
    anterior = _rib_bands((v - anterior_start - 0.3 * (body_half - au)) / (spacing_ribs * 1.05), 7, 0.35)
    image += rng.uniform(0.03, 0.06) * anterior * in_chest * _smoothstep((au - 0.12) / 0.08)
    clavicle_v = rng.uniform(-0.06, 0.02)
    clavicle = _rib_bands((v - clavicle_v + 0.15 * au - 0.12 * au**2) / 0.1, 1, 0.4) * ((au > 0.03) & (au < 0.42))
    image += rng.uniform(0.08, 0.14) * clavicle

    # ---- findings
    if present["cxr_pneumothorax"]:
        image -= rng_find.uniform(0.035, 0.08) * ptx_region_soft
        image += rng_find.uniform(0.07, 0.15) * _blur(ptx_line, 0.3 / spacing)

    visible = aerated_any & ~heart_mask
    if present["cxr_opacity"]:
        for _ in range(20):
            diameter = rng_find.uniform(30.0, 100.0)
            point = _pick_point(rng_find, visible, 0.2 * diameter / spacing)
            if point is None:
                break
            field_ = np.zeros(shape, np.float32)
            for _ in range(int(rng_find.integers(3, 7))):
                cr = point[0] + rng_find.normal(0.0, diameter / 7.0) / spacing
                cc = point[1] + rng_find.normal(0.0, diameter / 7.0) / spacing
                sigma = diameter * rng_find.uniform(0.2, 0.3) / spacing
                weight = rng_find.uniform(0.6, 1.0)
                # A 2-D Gaussian is the outer product of two 1-D ones: one pass over the image.
                along_rows = np.exp(-((np.arange(rows, dtype=np.float32) - cr) ** 2) / (2 * sigma**2))
                along_cols = np.exp(-((np.arange(cols, dtype=np.float32) - cc) ** 2) / (2 * sigma**2))
                field_ += np.float32(weight) * np.outer(along_rows, along_cols).astype(np.float32)
            field_ /= max(float(field_.max()), 1e-6)
            mask = (field_ > 0.35) & aerated_any
            disc_area = np.pi * (diameter / 2.0 / spacing) ** 2
            if mask.sum() >= 0.1 * disc_area:
                break
        if point is not None:
            blotch = _blur(rng_find.standard_normal(shape, dtype=np.float32), 4.0 / spacing)
            blotch /= max(float(blotch.std()), 1e-6)
            density = _smoothstep((field_ - 0.15) / 0.5) * (1.0 + 0.25 * blotch)
            image += rng_find.uniform(0.1, 0.25) * density * aerated_soft
            masks["cxr_opacity"] = mask
            # Size: the diameter of a disc with the mask's area.
            sizes["cxr_opacity"] = float(2.0 * np.sqrt(mask.sum() / np.pi) * spacing)
    if present["cxr_nodule"]:
        diameter = rng_find.uniform(5.0, 30.0)
        radius_px = diameter / 2.0 / spacing
        point = _pick_point(rng_find, visible, radius_px + 1.0 / spacing)
        if point is not None:
            cr = point[0] + rng_find.uniform(-0.5, 0.5)
            cc = point[1] + rng_find.uniform(-0.5, 0.5)
            r2 = (
                (np.arange(rows, dtype=np.float32)[:, None] + 0.5 - cr) ** 2
                + (np.arange(cols, dtype=np.float32)[None, :] + 0.5 - cc) ** 2
            ) / np.float32(max(radius_px, 0.5) ** 2)
            sphere = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)).astype(np.float32)
            # A solid sphere's projected thickness, a little blurred (partial volume).
            image += rng_find.uniform(0.14, 0.3) * _blur(sphere, 0.4 / spacing)
            mask = r2 <= 1.0
            mask[int(min(cr, rows - 1)), int(min(cc, cols - 1))] = True
            masks["cxr_nodule"] = mask
            sizes["cxr_nodule"] = float(diameter)

    # Global: slow exposure variation (heel effect, scatter).
    coarse = (max(4, rows // 16), max(4, cols // 16))
    slow = _blur(rng.standard_normal(coarse, dtype=np.float32), 40.0 / spacing / 16.0)
    slow = cv2.resize(slow, (cols, rows), interpolation=cv2.INTER_LINEAR)
    image += rng.uniform(-0.03, 0.03) * (v - 0.5) + rng.uniform(0.005, 0.02) * slow / max(float(slow.std()), 1e-6)
    image = _blur(image.astype(np.float32), rng.uniform(0.25, 0.6) / spacing)
    return np.clip(image, 0.0, 1.0), masks, sizes, body


def make_phantom(
    seed: Seed,
    *,
    shape: tuple[int, int] | None = None,
    pixel_spacing_mm: float | None = None,
    findings: Iterable[str] | None = None,
    prevalence: float = 0.5,
    bits_stored: int | None = None,
    monochrome1: bool | None = None,
    rescale: tuple[float, float] | None = None,
    voi: VoiFunction | None = None,
    extras: bool | None = None,
) -> Phantom:
    """One phantom, deterministic from `seed` and the arguments.

    shape: (rows, columns); default random, long side 300-700 pixels, rows/columns 0.85-1.3.
    pixel_spacing_mm: default the field of view's long side (350-440 mm) over the long side.
    findings: the tools whose finding is drawn; default each present with `prevalence`.
    bits_stored (10-16), monochrome1, rescale (slope, intercept), voi (LINEAR: a window in the
    header; AUTO: none): default random. extras: collimator borders / burnt-in marker, default random.
    """
    root = np.random.SeedSequence(list(seed) if isinstance(seed, Sequence) else seed)
    rng_shape, rng_anatomy, rng_find, rng_header, rng_noise = (np.random.default_rng(s) for s in root.spawn(5))

    chance = rng_find.random(len(TOOLS))
    if findings is None:
        present = {tool: bool(p < prevalence) for tool, p in zip(TOOLS, chance)}
    else:
        wanted = set(findings)
        unknown = wanted - set(TOOLS)
        if unknown:
            raise ValueError(f"unknown findings {sorted(unknown)}; known: {TOOLS}")
        present = {tool: tool in wanted for tool in TOOLS}

    if shape is None:
        long_side = int(rng_shape.integers(300, 701))
        aspect = rng_shape.uniform(0.85, 1.3)  # rows / columns
        shape = (long_side, max(64, round(long_side / aspect))) if aspect >= 1 else (round(long_side * aspect), long_side)
    else:
        rng_shape.integers(300, 701), rng_shape.uniform(0.85, 1.3)
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 64 or cols < 64:
        raise ValueError(f"shape {shape} is too small for a chest radiograph (64 pixels at least)")
    fov = rng_shape.uniform(350.0, 440.0)
    spacing = float(pixel_spacing_mm) if pixel_spacing_mm is not None else round(fov / max(rows, cols), 4)

    # Draw at no more than RENDER_MAX pixels on the long side.
    factor = min(1.0, RENDER_MAX / max(rows, cols))
    render_shape = (max(64, round(rows * factor)), max(64, round(cols * factor)))
    render_spacing = spacing * rows / render_shape[0]
    image, masks, sizes, body = _draw(rng_anatomy, rng_find, render_shape, render_spacing, present)
    if render_shape != (rows, cols):
        image = cv2.resize(image, (cols, rows), interpolation=cv2.INTER_LINEAR)
        body = cv2.resize(body.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST).astype(bool)
        masks = {
            tool: None
            if mask is None
            else cv2.resize(mask.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST).astype(bool)
            for tool, mask in masks.items()
        }

    # Detector: quantum noise, collimator borders, a burnt-in side marker.
    image = image + rng_noise.uniform(0.003, 0.014) * rng_noise.standard_normal((rows, cols), dtype=np.float32)
    use_extras = bool(rng_header.random() < 0.35) if extras is None else extras
    marker_mask = np.zeros((rows, cols), bool)
    if use_extras:
        border_value = 1.0 if rng_header.random() < 0.6 else 0.0
        for side in range(4):
            if rng_header.random() < 0.5:
                depth = int(rng_header.uniform(0.01, 0.05) * (rows if side < 2 else cols))
                region = [slice(None), slice(None)]
                region[side // 2] = slice(0, depth) if side % 2 == 0 else slice(-depth if depth else rows, None)
                image[tuple(region)] = border_value
                marker_mask[tuple(region)] = True
        height = max(8, rows // 25)
        top, left = int(rows * 0.04), int(cols * rng_header.uniform(0.05, 0.2))
        cv2.putText(image, "R", (left, top + height), cv2.FONT_HERSHEY_SIMPLEX, height / 22.0, 1.0, max(1, height // 8))
        marker_mask[top : top + 2 * height, left : left + 2 * height] = True
    image = np.clip(image, 0.0, 1.0).astype(np.float32)

    stored, params, bits = _to_stored(rng_header, image, body & ~marker_mask, bits_stored, monochrome1, rescale, voi)
    labels = {tool: masks[tool] is not None for tool in TOOLS}
    boxes = {tool: None if masks[tool] is None else _bbox(masks[tool]) for tool in TOOLS}
    return Phantom(stored, params, spacing, bits, labels, boxes, masks, seed, sizes)


def _to_stored(
    rng: np.random.Generator,
    image: np.ndarray,
    patient: np.ndarray,
    bits_stored: int | None,
    monochrome1: bool | None,
    rescale: tuple[float, float] | None,
    voi: VoiFunction | None,
) -> tuple[np.ndarray, GrayscaleParams, int]:
    """Display image -> stored values and the header that displays them again."""
    bits = int(rng.integers(10, 17)) if bits_stored is None else int(bits_stored)
    if not 8 <= bits <= 16:
        raise ValueError(f"bits_stored {bits} is outside 8..16")
    invert = bool(rng.random() < 0.3) if monochrome1 is None else bool(monochrome1)
    top = 2**bits - 1
    low, high = rng.uniform(0.0, 0.12) * top, rng.uniform(0.6, 1.0) * top
    gamma = rng.uniform(0.8, 1.25)  # detector/processing curves differ between vendors
    shown = image**gamma
    values = high - shown * (high - low) if invert else low + shown * (high - low)
    values += rng.uniform(-0.5, 0.5, values.shape)  # dither before rounding
    stored = np.clip(np.rint(values), 0, top).astype(np.uint16)

    if rescale is None:
        if rng.random() < 0.35:
            slope = float(rng.choice([0.25, 0.5, 1.0, 2.0]))
            intercept = float(rng.choice([-2048.0, -1024.0, 0.0, 100.0, 1000.0]))
        else:
            slope, intercept = 1.0, 0.0
    else:
        slope, intercept = float(rescale[0]), float(rescale[1])

    function = (VoiFunction.LINEAR if rng.random() < 0.5 else VoiFunction.AUTO) if voi is None else VoiFunction(voi)
    center = width = 0.0
    if function in (VoiFunction.LINEAR, VoiFunction.LINEAR_EXACT, VoiFunction.SIGMOID):
        sample = stored[::4, ::4][patient[::4, ::4]] if patient.any() else stored[::4, ::4].ravel()
        modality = sample.astype(np.float64) * slope + intercept
        lo, hi = np.percentile(modality, (0.5, 99.8))
        span = max(hi - lo, 4.0)
        center = float(np.rint((lo + hi) / 2.0 + rng.normal(0.0, 0.04) * span))
        width = float(max(2.0, np.rint(span * rng.uniform(0.95, 1.3))))
    elif function != VoiFunction.AUTO:
        raise ValueError(f"phantoms write LINEAR, LINEAR_EXACT, SIGMOID or AUTO, not {function!r}")
    params = GrayscaleParams(
        rescale_slope=slope,
        rescale_intercept=intercept,
        window_center=center,
        window_width=width,
        voi_function=function,
        invert=invert,
    )
    return stored, params, bits


def generate(seed: int, n: int, start: int = 0, **kwargs) -> Iterator[Phantom]:
    """Phantoms with the seeds (seed, start) ... (seed, start + n - 1)."""
    for index in range(start, start + n):
        yield make_phantom((seed, index), **kwargs)


# --------------------------------------------------------------------------------------
# network input and targets


def network_input(phantom: Phantom) -> tuple[np.ndarray, Letterbox]:
    """The network's input for a phantom: always through `mosmedai.catalog.imaging.preprocess`."""
    return preprocess(phantom.stored, phantom.params)


def heatmap_target(
    mask: np.ndarray | None, geometry: Letterbox, size: int = HEATMAP_SIZE, network_size: int = NETWORK_SIZE
) -> np.ndarray:
    """A finding's mask as the heatmap target: 1 where a heatmap cell covers any of it."""
    target = np.zeros((size, size), np.float32)
    if mask is None:
        return target
    new_h = max(1, round(geometry.height * geometry.scale))
    new_w = max(1, round(geometry.width * geometry.scale))
    small = cv2.resize(mask.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((network_size, network_size), np.float32)
    top, left = int(geometry.pad_top), int(geometry.pad_left)
    canvas[top : top + new_h, left : left + new_w] = small
    cell = network_size // size
    return (canvas.reshape(size, cell, size, cell).max(axis=(1, 3)) > 0.02).astype(np.float32)


# --------------------------------------------------------------------------------------
# DICOM


# Digital X-Ray Image Storage - For Presentation (PS3.4 B.5).


def _ds(value: float) -> str:
    """A Decimal String that round-trips the float exactly for the values phantoms use."""
    text = repr(float(value))
    text = text[:-2] if text.endswith(".0") else text
    if len(text) > 16:
        raise ValueError(f"{value} does not fit a DS (16 characters)")
    return text


def to_dataset(phantom: Phantom, **overrides) -> "pydicom.dataset.Dataset":  # noqa: F821
    """The phantom as a DX For Presentation dataset, Explicit VR Little Endian, uncompressed.

    overrides: DICOM keywords set last (``PatientID="X"``); None deletes the element.
    """
    from mosmedai.phantoms.dicom_build import build_dataset

    seed_text = "-".join(str(s) for s in phantom.seed) if isinstance(phantom.seed, Sequence) else str(phantom.seed)
    spacing = [_ds(round(phantom.pixel_spacing_mm, 6))] * 2
    attributes = dict(
        AccessionNumber="",
        StudyID="1",
        SeriesNumber=1,
        InstanceNumber=1,
        Manufacturer="mosmedai phantom",
        ReferringPhysicianName="",
        PatientName=f"PHANTOM^{seed_text}",
        PatientID=f"PHANTOM-{seed_text}",
        PatientBirthDate="",
        PatientSex="",
        BodyPartExamined="CHEST",
        ViewPosition="PA",
        PatientOrientation=["L", "F"],  # PA: columns towards the patient's left, rows towards the feet
        ImageType=["DERIVED", "PRIMARY"],
        PresentationIntentType="FOR PRESENTATION",
        SeriesDescription="Chest PA (synthetic phantom)",
        BurnedInAnnotation="NO",
        ImageLaterality="U",
        PixelIntensityRelationship="LIN",
        PixelIntensityRelationshipSign=-1 if phantom.params.invert else 1,
        RescaleSlope=_ds(phantom.params.rescale_slope),
        RescaleIntercept=_ds(phantom.params.rescale_intercept),
        RescaleType="US",
        PixelSpacing=spacing,
        ImagerPixelSpacing=spacing,
        LossyImageCompression="00",
    )
    if phantom.params.voi_function != VoiFunction.AUTO and phantom.params.window_width > 0:
        attributes.update(WindowCenter=_ds(phantom.params.window_center),
                          WindowWidth=_ds(phantom.params.window_width),
                          VOILUTFunction=phantom.params.voi_function.name)
    ds = build_dataset(np.ascontiguousarray(phantom.stored, dtype=np.uint16), modality="DX",
                       bits_stored=phantom.bits_stored, photometric=phantom.photometric_interpretation,
                       **attributes)
    ds["PixelData"].VR = "OW"
    return apply_overrides(ds, overrides)


def write_dicom(phantom: Phantom, path_or_buffer: str | os.PathLike | io.IOBase, **overrides):
    """Write the phantom as a DICOM Part 10 file; returns the pydicom dataset written."""
    ds = to_dataset(phantom, **overrides)
    ds.save_as(path_or_buffer, enforce_file_format=True)
    return ds


def dicom_bytes(phantom: Phantom, **overrides) -> bytes:
    """The phantom as the bytes of a DICOM Part 10 file."""
    buffer = io.BytesIO()
    write_dicom(phantom, buffer, **overrides)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------
# sets of phantoms as network arrays (training and evaluation)


def _sample_arrays(seed: Seed) -> tuple[np.ndarray, ...]:
    cv2.setNumThreads(1)
    phantom = make_phantom(seed)
    image, geometry = network_input(phantom)
    labels = np.array([phantom.labels[tool] for tool in TOOLS], bool)
    boxes = np.array([phantom.boxes[tool] or (-1, -1, -1, -1) for tool in TOOLS], np.float32)
    heatmaps = np.stack([heatmap_target(phantom.masks[tool], geometry) for tool in TOOLS]).astype(np.uint8)
    sizes = np.array([phantom.sizes_mm.get(tool, 0.0) for tool in TOOLS], np.float32)
    return image.astype(np.float16), geometry.as_vector(), labels, boxes, heatmaps, sizes, np.float32(phantom.pixel_spacing_mm)


def network_arrays(seed: int, n: int, start: int = 0, workers: int = 1) -> dict[str, np.ndarray]:
    """Phantoms (seed, start) ... (seed, start + n - 1), preprocessed, as arrays:

    image float16 [n, 256, 256] (from `mosmedai.catalog.imaging.preprocess`), geometry float32 [n, 5]
    (Letterbox.as_vector), labels bool [n, 3], boxes float32 [n, 3, 4] (source pixels, -1 when
    absent), heatmaps uint8 [n, 3, 32, 32] (targets), sizes_mm float32 [n, 3], spacing_mm [n];
    the second axis follows TOOLS.
    """
    rows = map_items(_sample_arrays, [(seed, index) for index in range(start, start + n)], workers)
    return stack_columns(rows, ("image", "geometry", "labels", "boxes", "heatmaps", "sizes_mm", "spacing_mm"))
