"""Synthetic screening fluorograms (FLG, ФЛГ) with known findings, for the fluorography tools.

This module owns the phantoms (`make_phantom`, `FlgPhantom`), their network input (the
serving path's own preprocess) and their DICOM form (`to_dataset`); training, evaluation and
the model cards are in ``mosmedai_training.fluorography``.

Phantoms reuse the chest X-ray anatomy of `mosmedai.phantoms.chest_xray` (its drawing
function, with its opacity and nodule findings) and add what screening fluorography needs:

* ``fibrosis``: fibrotic / post-tuberculous changes in one upper zone - fibrous strands
  running from the apex towards the hilum, small calcified foci (1.5-5 mm, very bright),
  sometimes an apical pleural cap and a faint upper-zone haze;
* smaller images (long side 800-1200 pixels), mostly 8-bit stored (Bits Allocated 8),
  MONOCHROME1 or 2, and more quantum noise than diagnostic films.

Findings are drawn independently: nodule 35 %, fibrosis 35 %, opacity 20 %. The triage tool's
"abnormal" is any of the three. Reference phantoms on synthetic data: not for clinical use.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import pydicom

from mosmedai.catalog.imaging import GrayscaleParams, Letterbox, VoiFunction, preprocess
from mosmedai.phantoms import chest_xray as cxr
from mosmedai.phantoms.common import apply_overrides

TOOLS = ("flg_triage", "flg_nodule", "flg_fibrosis")
#: Findings drawn into the phantoms; the triage label is any of them.
FINDINGS = ("nodule", "fibrosis", "opacity")
PREVALENCE = {"nodule": 0.35, "fibrosis": 0.35, "opacity": 0.2}
#: Which finding masks make each tool's label and heatmap target.
TOOL_FINDINGS = {"flg_triage": FINDINGS, "flg_nodule": ("nodule",), "flg_fibrosis": ("fibrosis",)}

#: Long side of served fluorograms (cases, held-out evaluation): `make_phantom`'s default.
SERVED_LONG_SIDE = (800, 1200)
#: Quantum noise (display units) at a 1000-pixel long side; scaled with the long side so the
#: network input (averaged down to 256) sees the same noise whatever the source size.
NOISE_AT_1000 = (0.012, 0.03)

Seed = int | Sequence[int]
Box = tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class FlgPhantom:
    """One synthetic fluorogram as stored, with its ground truth (boxes in source pixel edges)."""

    stored: np.ndarray  # uint8 (8-bit) or uint16 [rows, columns]
    params: GrayscaleParams
    pixel_spacing_mm: float
    bits_stored: int
    labels: dict[str, bool]  # per finding and "abnormal"
    boxes: dict[str, Box | None]  # per finding
    masks: dict[str, np.ndarray | None] = field(repr=False)
    seed: Seed = 0
    sizes_mm: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.stored.shape  # type: ignore[return-value]

    @property
    def photometric_interpretation(self) -> str:
        return "MONOCHROME1" if self.params.invert else "MONOCHROME2"

    def label(self, tool: str) -> bool:
        return any(self.labels[f] for f in TOOL_FINDINGS[tool])

    def mask(self, tool: str) -> np.ndarray | None:
        parts = [self.masks[f] for f in TOOL_FINDINGS[tool] if self.masks[f] is not None]
        if not parts:
            return None
        return np.logical_or.reduce(parts)

    def box(self, tool: str) -> Box | None:
        """Truth box of a tool: the finding's box; for triage the box of all findings."""
        mask = self.mask(tool)
        return None if mask is None else cxr._bbox(mask)


# --------------------------------------------------------------------------------------
# phantoms


def _lung_geometry(rng: np.random.Generator, shape: tuple[int, int], spacing: float):
    """Replays the first draws of `chest_xray._draw` on a copy of its generator: the lung masks
    (per side) and the normalised vertical coordinate v (0 at the apex, ~1 at the bases)."""
    rows, cols = shape
    height_mm, width_mm = rows * spacing, cols * spacing
    lateral = rng.uniform(0.46, 0.56)
    scale = min(rng.uniform(215.0, 285.0), 0.74 * height_mm, 0.88 * width_mm / (2 * lateral * 1.1))
    centre_x = width_mm / 2.0 + rng.normal(0.0, 0.025) * width_mm
    slack = height_mm - 1.08 * scale
    apex_y = rng.uniform(0.25, 0.7) * slack
    y = (np.arange(rows, dtype=np.float32) + 0.5) * spacing
    x = (np.arange(cols, dtype=np.float32) + 0.5) * spacing
    v = ((y - apex_y) / scale)[:, None] * np.ones((1, cols), np.float32)
    u = ((x - centre_x) / scale)[None, :] * np.ones((rows, 1), np.float32)
    lungs = {
        side: cxr._Lung(
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
    masks = {side: cxr._lung_mask(np.abs(u), v, lung) & (side_of == side) for side, lung in lungs.items()}
    hilum = {side: (apex_y / spacing + 0.45 * scale / spacing,
                    (centre_x + side * (lungs[side].medial + 0.07) * scale) / spacing) for side in (-1, 1)}
    return masks, v, scale, hilum


def _draw_fibrosis(rng: np.random.Generator, image: np.ndarray, lungs: dict, v: np.ndarray, scale: float,
                   hilum: dict, spacing: float) -> tuple[np.ndarray | None, float]:
    """Fibrotic / post-tuberculous changes in one upper zone, drawn into `image` in place.
    Returns the finding's mask and its extent (mm), or (None, 0) when no room."""
    side = int(rng.choice([-1, 1]))
    lung = lungs[side]
    zone_cut = rng.uniform(0.3, 0.4)
    zone = lung & (v < zone_cut) & (v > 0.01)
    margin = max(1, int(round(3.0 / spacing)))
    inner = cv2.erode(zone.astype(np.uint8), np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)).astype(bool)
    if inner.sum() < 20:
        return None, 0.0
    rows, cols = image.shape
    strands = np.zeros((rows, cols), np.uint8)
    foci = np.zeros((rows, cols), np.float32)
    candidates = np.flatnonzero(inner.ravel())
    anchor = divmod(int(candidates[rng.integers(candidates.size)]), cols)
    hr, hc = hilum[side]
    for _ in range(int(rng.integers(3, 8))):
        # Strands start near the anchor and run towards the hilum (down and medial), wavy.
        start = (anchor[0] + rng.normal(0, 8.0 / spacing), anchor[1] + rng.normal(0, 10.0 / spacing))
        angle = math.atan2(hr - start[0], hc - start[1]) + rng.normal(0.0, 0.45)
        length = rng.uniform(12.0, 40.0) / spacing
        points = [start]
        for _ in range(4):
            angle += rng.normal(0.0, 0.3)
            r, c = points[-1]
            points.append((r + math.sin(angle) * length / 4, c + math.cos(angle) * length / 4))
        polyline = np.array([[c, r] for r, c in points], np.float32)
        thickness = max(1, int(round(rng.uniform(0.8, 2.2) / spacing)))
        cv2.polylines(strands, [np.rint(polyline * 4).astype(np.int32)], False, 255, thickness=thickness, shift=2)
    strands &= (cv2.dilate(zone.astype(np.uint8), np.ones((3, 3), np.uint8)) * 255).astype(np.uint8)
    rr = np.arange(rows, dtype=np.float32)[:, None] + 0.5
    cc = np.arange(cols, dtype=np.float32)[None, :] + 0.5
    calc_mask = np.zeros((rows, cols), bool)
    for _ in range(int(rng.integers(1, 6))):
        cr = anchor[0] + rng.normal(0, 9.0 / spacing)
        ccen = anchor[1] + rng.normal(0, 11.0 / spacing)
        radius = max(rng.uniform(0.75, 2.5) / spacing, 0.7)
        r0, r1 = int(max(0, cr - radius - 2)), int(min(rows, cr + radius + 3))
        c0, c1 = int(max(0, ccen - radius - 2)), int(min(cols, ccen + radius + 3))
        if r0 >= r1 or c0 >= c1:
            continue
        d2 = ((rr[r0:r1] - cr) ** 2 + (cc[:, c0:c1] - ccen) ** 2) / radius**2
        foci[r0:r1, c0:c1] = np.maximum(foci[r0:r1, c0:c1], np.sqrt(np.clip(1.0 - d2, 0.0, 1.0)))
        calc_mask[r0:r1, c0:c1] |= d2 <= 1.0
    strand_f = strands.astype(np.float32) / 255.0
    image += rng.uniform(0.07, 0.15) * cxr._blur(strand_f, 0.4 / spacing)
    image += rng.uniform(0.2, 0.4) * cxr._blur(foci, 0.25 / spacing)
    mask = (strand_f > 0.5) | calc_mask
    if rng.random() < 0.5:  # apical pleural cap: a thickened band along the apex
        band = lung & ~cv2.erode(lung.astype(np.uint8), np.ones((max(3, int(5.0 / spacing)),) * 2, np.uint8)).astype(bool)
        band &= v < 0.08
        image += rng.uniform(0.06, 0.12) * cxr._blur(band.astype(np.float32), 1.0 / spacing)
        mask |= band
    # Volume loss / haze of the affected upper zone, strongest around the strands.
    near = cxr._blur(mask.astype(np.float32), 8.0 / spacing)
    image += rng.uniform(0.02, 0.05) * np.clip(near / max(float(near.max()), 1e-6), 0, 1) * zone
    box = cxr._bbox(mask)
    if box is None:
        return None, 0.0
    extent = max(box[2] - box[0], box[3] - box[1]) * spacing
    return mask, float(extent)


def make_phantom(seed: Seed, *, long_side: tuple[int, int] = SERVED_LONG_SIDE,
                 findings: Sequence[str] | None = None, bits_stored: int | None = None,
                 monochrome1: bool | None = None, voi: VoiFunction | None = None) -> FlgPhantom:
    """One fluorogram, deterministic from `seed` and the arguments.

    long_side: range of the long side in pixels (rows/columns 0.9-1.1); default served sizes.
    findings: subset of FINDINGS drawn; default each present with PREVALENCE.
    bits_stored: default 8 (70 %) or 10-12; monochrome1 default 50 %; voi default random.
    """
    root = np.random.SeedSequence(list(seed) if isinstance(seed, Sequence) and not isinstance(seed, str) else seed)
    rng_shape, rng_anatomy, rng_find, rng_header, rng_noise, rng_fib, rng_choice = (
        np.random.default_rng(s) for s in root.spawn(7))
    chance = rng_choice.random(len(FINDINGS))
    if findings is None:
        present = {f: bool(p < PREVALENCE[f]) for f, p in zip(FINDINGS, chance)}
    else:
        unknown = set(findings) - set(FINDINGS)
        if unknown:
            raise ValueError(f"unknown findings {sorted(unknown)}; known: {FINDINGS}")
        present = {f: f in findings for f in FINDINGS}

    long = int(rng_shape.integers(long_side[0], long_side[1] + 1))
    aspect = rng_shape.uniform(0.9, 1.1)  # rows / columns
    rows, cols = (long, round(long / aspect)) if aspect >= 1 else (round(long * aspect), long)
    spacing = round(rng_shape.uniform(360.0, 420.0) / long, 4)

    factor = min(1.0, cxr.RENDER_MAX / max(rows, cols))
    render_shape = (max(64, round(rows * factor)), max(64, round(cols * factor)))
    render_spacing = spacing * rows / render_shape[0]
    lungs, v, scale, hilum = _lung_geometry(copy.deepcopy(rng_anatomy), render_shape, render_spacing)
    image, cxr_masks, cxr_sizes, body = cxr._draw(
        rng_anatomy, rng_find, render_shape, render_spacing,
        {"cxr_opacity": present["opacity"], "cxr_nodule": present["nodule"], "cxr_pneumothorax": False})
    masks = {"nodule": cxr_masks["cxr_nodule"], "opacity": cxr_masks["cxr_opacity"], "fibrosis": None}
    sizes = {"nodule": cxr_sizes.get("cxr_nodule", 0.0), "opacity": cxr_sizes.get("cxr_opacity", 0.0)}
    if present["fibrosis"]:
        masks["fibrosis"], sizes["fibrosis"] = _draw_fibrosis(rng_fib, image, lungs, v, scale, hilum, render_spacing)
    image = np.clip(image, 0.0, 1.0)
    if render_shape != (rows, cols):
        image = cv2.resize(image, (cols, rows), interpolation=cv2.INTER_LINEAR)
        body = cv2.resize(body.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST).astype(bool)
        masks = {k: None if m is None else
                 cv2.resize(m.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST).astype(bool)
                 for k, m in masks.items()}
    sigma = rng_noise.uniform(*NOISE_AT_1000) * max(rows, cols) / 1000.0
    image = image + sigma * rng_noise.standard_normal((rows, cols), dtype=np.float32)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)

    bits = (8 if rng_header.random() < 0.7 else int(rng_header.integers(10, 13))) if bits_stored is None else bits_stored
    invert = bool(rng_header.random() < 0.5) if monochrome1 is None else monochrome1
    stored, params, bits = cxr._to_stored(rng_header, image, body, bits, invert, (1.0, 0.0), voi)
    if bits <= 8:
        stored = stored.astype(np.uint8)
    masks = {k: (m if m is not None and m.any() else None) for k, m in masks.items()}
    labels = {f: masks[f] is not None for f in FINDINGS}
    labels["abnormal"] = any(labels.values())
    boxes = {f: None if masks[f] is None else cxr._bbox(masks[f]) for f in FINDINGS}
    return FlgPhantom(stored, params, spacing, bits, labels, boxes, masks, seed,
                      {k: float(s) for k, s in sizes.items() if masks.get(k) is not None})


def network_input(phantom: FlgPhantom) -> tuple[np.ndarray, Letterbox]:
    """The network input: the serving path's own `mosmedai.catalog.imaging.preprocess`."""
    return preprocess(phantom.stored, phantom.params)


DESCRIPTIONS = ("FLG chest screening (synthetic phantom)", "ФЛГ ОГК (synthetic phantom)",
                "Fluorography PA (synthetic phantom)", "ФЛЮОРОГРАФИЯ (synthetic phantom)")


def to_dataset(phantom: FlgPhantom, description: str = DESCRIPTIONS[0], **overrides) -> pydicom.Dataset:
    """The phantom as a DX For Presentation dataset (Explicit VR Little Endian; 8-bit stored as
    Bits Allocated 8), UTF-8 character set for Cyrillic descriptions."""
    from mosmedai.phantoms.dicom_build import build_dataset

    seed_text = "-".join(str(s) for s in phantom.seed) if isinstance(phantom.seed, Sequence) else str(phantom.seed)
    spacing = [cxr._ds(round(phantom.pixel_spacing_mm, 6))] * 2
    attributes = dict(
        SpecificCharacterSet="ISO_IR 192",
        AccessionNumber="", StudyID="1", SeriesNumber=1, InstanceNumber=1,
        Manufacturer="mosmedai phantom", ReferringPhysicianName="",
        PatientName=f"PHANTOM^FLG{seed_text}", PatientID=f"PHANTOM-FLG-{seed_text}",
        PatientBirthDate="", PatientSex="",
        BodyPartExamined="CHEST", ViewPosition="PA", PatientOrientation=["L", "F"],
        ImageType=["DERIVED", "PRIMARY"], PresentationIntentType="FOR PRESENTATION",
        SeriesDescription=description, BurnedInAnnotation="NO", ImageLaterality="U",
        PixelIntensityRelationship="LIN", PixelIntensityRelationshipSign=-1 if phantom.params.invert else 1,
        RescaleSlope="1", RescaleIntercept="0", RescaleType="US",
        PixelSpacing=spacing, ImagerPixelSpacing=spacing, LossyImageCompression="00",
    )
    if phantom.params.voi_function != VoiFunction.AUTO and phantom.params.window_width > 0:
        attributes.update(WindowCenter=cxr._ds(phantom.params.window_center),
                          WindowWidth=cxr._ds(phantom.params.window_width),
                          VOILUTFunction=phantom.params.voi_function.name)
    dataset = build_dataset(np.ascontiguousarray(phantom.stored), modality="DX", bits_stored=phantom.bits_stored,
                            photometric=phantom.photometric_interpretation, **attributes)
    dataset["PixelData"].VR = "OB" if phantom.stored.dtype == np.uint8 else "OW"
    return apply_overrides(dataset, overrides)
