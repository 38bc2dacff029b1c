"""Synthetic AP whole-spine radiographs with a known Cobb angle, for the scoliosis tool.

This module owns the phantoms (`make_phantom`, `SpinePhantom`), their network input (the
serving path's own preprocess) and their DICOM form (`to_dataset`); training (with its
targets, `map_targets`), evaluation and the model card are in ``mosmedai_training.spine_xray``.

Phantoms: frontal (AP) whole-spine radiographs with the 17 vertebrae T1-L5 drawn as rotated
rectangles (slightly waisted, brighter cortical end plates, pedicle rings, spinous process)
along a smooth lateral curve - a C curve or an S curve - whose end-plate tilts are known.
Context: soft tissue, lungs, twelve pairs of ribs, iliac wings and sacrum, exposure gradient,
blur and quantum noise; stored values as modalities vary them (Bits Stored 10-16,
Rescale, MONOCHROME1/2, a window or none).

Each vertebra i has one end-plate tilt theta_i (degrees; upper and lower end plates
parallel): the curve's tilt profile plus a small per-vertebra irregularity (SD 0.7 deg) and
a global lean (pelvic obliquity, +-3 deg). Ground truth Cobb angle = max_i theta_i - min_i
theta_i: the largest angle between any two end plates, i.e. the major curve's Cobb angle
between its end vertebrae. Angles are in source pixel space with square pixels.

Target Cobb angles: 30 % 0-10 deg, 30 % 10-25, 25 % 25-50, 15 % 50-75. Reference phantoms on
synthetic data: not for clinical use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import pydicom

from mosmedai.catalog.families.spine_xray import POSITIVE_COBB_DEG, grade_of
from mosmedai.catalog.imaging import GrayscaleParams, Letterbox, VoiFunction, preprocess
from mosmedai.phantoms import chest_xray as cxr
from mosmedai.phantoms.common import apply_overrides

VERTEBRAE = tuple(f"T{i}" for i in range(1, 13)) + tuple(f"L{i}" for i in range(1, 6))

#: Rows of the served images (cases, held-out evaluation): `make_phantom`'s default.
SERVED_ROWS = (900, 1024)

Seed = int | Sequence[int]
Box = tuple[float, float, float, float]


@dataclass(frozen=True, eq=False)
class SpinePhantom:
    stored: np.ndarray  # uint16 [rows, columns]
    params: GrayscaleParams
    pixel_spacing_mm: float
    bits_stored: int
    tilts_deg: np.ndarray  # [17] end-plate tilt of T1..L5, degrees (positive: clockwise on screen)
    centres: np.ndarray  # [17, 2] (row, column) source pixels
    corners: np.ndarray = field(repr=False)  # [17, 4, 2] (row, column) corners of each body
    curve: str = "C"
    seed: Seed = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.stored.shape  # type: ignore[return-value]

    @property
    def photometric_interpretation(self) -> str:
        return "MONOCHROME1" if self.params.invert else "MONOCHROME2"

    @property
    def cobb_deg(self) -> float:
        return float(self.tilts_deg.max() - self.tilts_deg.min())

    @property
    def end_vertebrae(self) -> tuple[int, int]:
        a, b = int(np.argmax(self.tilts_deg)), int(np.argmin(self.tilts_deg))
        return min(a, b), max(a, b)

    @property
    def grade(self) -> int:
        return grade_of(self.cobb_deg)

    @property
    def positive(self) -> bool:
        return self.cobb_deg >= POSITIVE_COBB_DEG

    @property
    def box(self) -> Box:
        """Box of the curve: the vertebral bodies from the upper to the lower end vertebra."""
        first, last = self.end_vertebrae
        points = self.corners[first : last + 1].reshape(-1, 2)
        return (float(points[:, 0].min()), float(points[:, 1].min()),
                float(points[:, 0].max()), float(points[:, 1].max()))


def _target_cobb(rng: np.random.Generator) -> float:
    u = rng.random()
    if u < 0.3:
        return rng.uniform(0.0, 10.0)
    if u < 0.6:
        return rng.uniform(10.0, 25.0)
    if u < 0.85:
        return rng.uniform(25.0, 50.0)
    return rng.uniform(50.0, 75.0)


def _tilt_profile(rng: np.random.Generator, cobb: float) -> tuple[np.ndarray, str]:
    """Tilts (deg) of the 17 vertebrae for a target major-curve Cobb angle."""
    f = np.arange(17) / 16.0
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if rng.random() < 0.55:
        s0, s1 = rng.uniform(0.0, 0.3), rng.uniform(0.7, 1.0)
        phase = np.clip((f - s0) / (s1 - s0), 0.0, 1.0)
        profile, curve = (cobb / 2.0) * np.cos(np.pi * phase), "C"
    else:
        s0, s1 = rng.uniform(0.0, 0.1), rng.uniform(0.9, 1.0)
        phase = np.clip((f - s0) / (s1 - s0), 0.0, 1.0)
        minor = rng.uniform(0.6, 1.0)  # the second (minor) curve
        weight = np.where(phase < 0.5, 1.0, minor) if rng.random() < 0.5 else np.where(phase < 0.5, minor, 1.0)
        profile, curve = (cobb / 2.0) * np.cos(2 * np.pi * phase) * weight, "S"
    tilts = sign * profile + rng.uniform(-3.0, 3.0) + rng.normal(0.0, 0.7, 17)
    return tilts.astype(np.float64), curve


def _smooth_edge(distance: np.ndarray, pixel: float) -> np.ndarray:
    """1 inside (distance > 0), 0 outside, linear over one pixel: anti-aliased edges."""
    return np.clip(distance / pixel + 0.5, 0.0, 1.0)


def _render(rng: np.random.Generator, shape: tuple[int, int], spacing: float, tilts: np.ndarray):
    """Display image, per-vertebra centres/corners (pixels), and a body label map (index+1)."""
    rows, cols = shape
    height_mm, width_mm = rows * spacing, cols * spacing
    size = rng.uniform(0.85, 1.08)
    heights = size * np.concatenate([np.linspace(14.0, 22.0, 12), np.linspace(24.0, 28.0, 5)])
    widths = size * np.concatenate([np.linspace(26.0, 40.0, 12), np.linspace(42.0, 50.0, 5)])
    discs = size * np.concatenate([np.linspace(3.5, 6.0, 12), np.linspace(8.0, 10.0, 5)])

    # Walk down the spine: each vertebra along its own axis direction (sin t, cos t).
    theta = np.radians(tilts)
    centres_mm = np.zeros((17, 2))  # (x, y) mm
    x, y = 0.0, 0.0
    for i in range(17):
        dx, dy = math.sin(theta[i]), math.cos(theta[i])
        centres_mm[i] = (x + dx * heights[i] / 2, y + dy * heights[i] / 2)
        x, y = x + dx * (heights[i] + discs[i]), y + dy * (heights[i] + discs[i])
    top = rng.uniform(0.05, 0.1) * height_mm
    centres_mm[:, 1] += top
    mid_x = (centres_mm[:, 0].max() + centres_mm[:, 0].min()) / 2
    centres_mm[:, 0] += width_mm / 2 - mid_x + rng.normal(0.0, 4.0)

    ys = (np.arange(rows, dtype=np.float32) + 0.5) * spacing
    xs = (np.arange(cols, dtype=np.float32) + 0.5) * spacing
    spine_x = np.interp(ys, centres_mm[:, 1], centres_mm[:, 0]).astype(np.float32)

    # Soft tissue: the torso across most of the width, thickest in the middle.
    half = width_mm * rng.uniform(0.4, 0.48)
    body_centre = width_mm / 2 + rng.normal(0.0, 3.0)
    thickness = np.sqrt(np.clip(1.0 - ((xs[None, :] - body_centre) / half) ** 2, 0.0, 1.0)) * np.ones((rows, 1), np.float32)
    background = rng.uniform(0.02, 0.07)
    image = background + (rng.uniform(0.32, 0.45) - background) * np.clip(thickness / 0.2, 0, 1) * (0.85 + 0.15 * thickness)
    body = thickness > 0

    # Lungs beside the thoracic spine (T1 to ~T11), darker.
    lung_top, lung_bottom = centres_mm[0, 1] - 12.0, centres_mm[10, 1] + rng.uniform(-10, 15)
    t = (ys[:, None] - lung_top) / (lung_bottom - lung_top)
    lung_half = rng.uniform(38.0, 50.0) * np.sqrt(np.clip(t * 4.0, 0.0, 1.0))
    lung = np.zeros((rows, cols), np.float32)
    for side in (-1, 1):
        offset = spine_x[:, None] + side * rng.uniform(55.0, 68.0)
        inside = (lung_half - np.abs(xs[None, :] - offset)) * ((t >= 0) & (t <= 1))
        lung = np.maximum(lung, _smooth_edge(inside, 3.0))
    image -= rng.uniform(0.12, 0.2) * cxr._blur(lung, 4.0 / spacing)

    # Ribs (T1-T12), each side: a band leaving the vertebra up-laterally, then curving down.
    ribs = np.zeros((rows, cols), np.uint8)
    for i in range(12):
        cx, cy = centres_mm[i]
        for side in (-1, 1):
            d = np.linspace(0.0, rng.uniform(95.0, 125.0) * (0.7 + 0.03 * i if i < 10 else 0.6), 24)
            px = cx + side * (widths[i] / 2 + d)
            py = cy - 0.12 * d + 0.0045 * d**2
            points = np.stack([px / spacing, py / spacing], axis=1)
            cv2.polylines(ribs, [np.rint(points * 4).astype(np.int32)], False, 255,
                          thickness=max(1, int(round(rng.uniform(7.0, 10.0) * size / spacing))), shift=2)
    image += rng.uniform(0.05, 0.09) * cxr._blur(ribs.astype(np.float32) / 255.0, 1.0 / spacing) * body

    # Pelvis below L5: iliac wings (rimmed ellipses) and the sacrum.
    pelvis = np.zeros((rows, cols), np.uint8)
    rim = np.zeros((rows, cols), np.uint8)
    lx, ly = centres_mm[16]
    for side in (-1, 1):
        centre = (int(round((lx + side * 75.0 * size) / spacing * 4)), int(round((ly + 45.0 * size) / spacing * 4)))
        axes = (int(round(55.0 * size / spacing * 4)), int(round(50.0 * size / spacing * 4)))
        cv2.ellipse(pelvis, centre, axes, 0, 180, 360, 255, -1, shift=2)
        cv2.ellipse(rim, centre, axes, 0, 180, 360, 255, max(1, int(round(4.0 / spacing))), shift=2)
    sacrum = np.array([[lx - 28 * size, ly + heights[16] / 2 + 8], [lx + 28 * size, ly + heights[16] / 2 + 8],
                       [lx, ly + 110 * size]]) / spacing
    cv2.fillConvexPoly(pelvis, np.rint(sacrum * 4).astype(np.int32), 255, shift=2)
    image += rng.uniform(0.06, 0.1) * cxr._blur(pelvis.astype(np.float32) / 255.0, 1.5 / spacing)
    image += rng.uniform(0.05, 0.09) * cxr._blur(rim.astype(np.float32) / 255.0, 0.8 / spacing)

    # Vertebral bodies.
    label = np.zeros((rows, cols), np.uint8)
    corners = np.zeros((17, 4, 2))
    body_value = rng.uniform(0.1, 0.16)
    plate_value = rng.uniform(0.08, 0.14)
    for i in range(17):
        cx, cy = centres_mm[i]
        w2, h2 = widths[i] / 2, heights[i] / 2
        ca, sa = math.cos(theta[i]), math.sin(theta[i])
        # Local axes: along the end plate (ca, -sa), along the spine (sa, ca) in (x, y).
        for k, (a, b) in enumerate(((-w2, -h2), (w2, -h2), (w2, h2), (-w2, h2))):
            corners[i, k] = ((cy + (-sa) * a + ca * b) / spacing, (cx + ca * a + sa * b) / spacing)
        reach = math.hypot(w2, h2) + 3.0
        r0, r1 = max(0, int((cy - reach) / spacing)), min(rows, int((cy + reach) / spacing) + 2)
        c0, c1 = max(0, int((cx - reach) / spacing)), min(cols, int((cx + reach) / spacing) + 2)
        if r0 >= r1 or c0 >= c1:
            continue
        gx, gy = xs[None, c0:c1] - cx, ys[r0:r1, None] - cy
        a = gx * ca - gy * sa
        b = gx * sa + gy * ca
        waist = w2 * (1.0 - 0.07 * (1.0 - (b / h2) ** 2))
        inside = _smooth_edge(waist - np.abs(a), spacing) * _smooth_edge(h2 - np.abs(b), spacing)
        plate = inside * _smooth_edge(np.abs(b) - (h2 - 1.6), spacing)
        cortex = inside * _smooth_edge(np.abs(a) - (waist - 1.6), spacing)
        pedicles = np.zeros_like(inside)
        for side in (-1, 1):
            q = ((a - side * 0.3 * w2 * 2) / (0.1 * w2 * 2)) ** 2 + ((b + 0.1 * h2) / (0.33 * h2)) ** 2
            pedicles = np.maximum(pedicles, np.clip(1.0 - np.abs(q - 1.0) * 2.5, 0, 1))
        spinous = np.clip(1.0 - (a / (0.08 * w2 * 2)) ** 2 - ((b - 0.4 * h2) / (0.5 * h2)) ** 2, 0, 1)
        image[r0:r1, c0:c1] += (body_value * inside + plate_value * plate + 0.05 * cortex
                                + 0.07 * pedicles * inside + 0.05 * spinous)
        label[r0:r1, c0:c1] = np.where(inside > 0.5, i + 1, label[r0:r1, c0:c1])

    # Exposure gradient and detector blur.
    image += rng.uniform(-0.04, 0.04) * (ys[:, None] / height_mm - 0.5)
    image = cxr._blur(image.astype(np.float32), rng.uniform(0.3, 0.7) / spacing)
    centres = np.stack([centres_mm[:, 1], centres_mm[:, 0]], axis=1) / spacing
    return np.clip(image, 0.0, 1.0).astype(np.float32), centres, corners, label, body


def make_phantom(seed: Seed, *, rows_range: tuple[int, int] = SERVED_ROWS, cobb: float | None = None) -> SpinePhantom:
    """One AP whole-spine phantom, deterministic from `seed`; `cobb` forces the target angle."""
    root = np.random.SeedSequence(list(seed) if isinstance(seed, Sequence) else seed)
    rng_shape, rng_curve, rng_anatomy, rng_header, rng_noise = (np.random.default_rng(s) for s in root.spawn(5))
    rows = int(rng_shape.integers(rows_range[0], rows_range[1] + 1))
    cols = int(round(rows * rng_shape.uniform(0.42, 0.55)))
    spacing = round(rng_shape.uniform(520.0, 600.0) / rows, 4)
    target = _target_cobb(rng_curve) if cobb is None else float(cobb)
    tilts, curve = _tilt_profile(rng_curve, target)
    image, centres, corners, label, body = _render(rng_anatomy, (rows, cols), spacing, tilts)
    sigma = rng_noise.uniform(0.006, 0.02) * rows / 1000.0
    image = np.clip(image + sigma * rng_noise.standard_normal((rows, cols), dtype=np.float32), 0.0, 1.0)
    stored, params, bits = cxr._to_stored(rng_header, image, body, None, None, None, None)
    phantom = SpinePhantom(stored, params, spacing, bits, tilts, centres, corners, curve, seed)
    object.__setattr__(phantom, "_label", label)
    return phantom


def network_input(phantom: SpinePhantom) -> tuple[np.ndarray, Letterbox]:
    return preprocess(phantom.stored, phantom.params)


#: (BodyPartExamined, SeriesDescription) of the cases, in turn.
HEADERS = (("SPINE", "Spine AP scoliosis (synthetic phantom)"),
           ("WHOLESPINE", "Whole spine AP (synthetic phantom)"),
           ("TSPINE", "Позвоночник AP, сколиоз (synthetic phantom)"))


def to_dataset(phantom: SpinePhantom, body_part: str = "SPINE", description: str = HEADERS[0][1],
               **overrides) -> pydicom.Dataset:
    """The phantom as a DX For Presentation dataset (Explicit VR Little Endian, UTF-8)."""
    from mosmedai.phantoms.dicom_build import build_dataset

    seed_text = "-".join(str(s) for s in phantom.seed) if isinstance(phantom.seed, Sequence) else str(phantom.seed)
    spacing = [cxr._ds(round(phantom.pixel_spacing_mm, 6))] * 2
    attributes = dict(
        SpecificCharacterSet="ISO_IR 192",
        AccessionNumber="", StudyID="1", SeriesNumber=1, InstanceNumber=1,
        Manufacturer="mosmedai phantom", ReferringPhysicianName="",
        PatientName=f"PHANTOM^SPINE{seed_text}", PatientID=f"PHANTOM-SPINE-{seed_text}",
        PatientBirthDate="", PatientSex="",
        BodyPartExamined=body_part, ViewPosition="AP", PatientOrientation=["L", "F"],
        ImageType=["DERIVED", "PRIMARY"], PresentationIntentType="FOR PRESENTATION",
        SeriesDescription=description, BurnedInAnnotation="NO", ImageLaterality="U",
        PixelIntensityRelationship="LIN", PixelIntensityRelationshipSign=-1 if phantom.params.invert else 1,
        RescaleSlope=cxr._ds(phantom.params.rescale_slope), RescaleIntercept=cxr._ds(phantom.params.rescale_intercept),
        RescaleType="US", PixelSpacing=spacing, ImagerPixelSpacing=spacing, LossyImageCompression="00",
    )
    if phantom.params.voi_function != VoiFunction.AUTO and phantom.params.window_width > 0:
        attributes.update(WindowCenter=cxr._ds(phantom.params.window_center),
                          WindowWidth=cxr._ds(phantom.params.window_width),
                          VOILUTFunction=phantom.params.voi_function.name)
    dataset = build_dataset(np.ascontiguousarray(phantom.stored, np.uint16), modality="DX",
                            bits_stored=phantom.bits_stored, photometric=phantom.photometric_interpretation,
                            **attributes)
    dataset["PixelData"].VR = "OW"
    return apply_overrides(dataset, overrides)
