"""Synthetic 2D mammograms with known findings, for the mammography tools.

This module owns the phantoms (`make_phantom`, `Phantom`), their network input (the serving
path's own preprocess) and their DICOM form (`to_dataset`); training, evaluation, the model
cards and the cases are in ``mosmedai_training.mammography``.

Phantoms (`make_phantom`): a compressed breast seen CC or MLO, left or right - a semi-ellipse
against the chest wall (left breast: chest wall on the image's left, as DICOM's "A" row
direction; right breast mirrored), fat that darkens towards the skin, a skin line, the
pectoral muscle triangle at the top of the chest wall on MLO, and fibroglandular tissue whose
share of the breast sets the ACR density category (a < 25 %, b 25-50 %, c 50-75 %, d >= 75 %).
Findings are drawn independently, each with probability 0.5:

* mass (``mg_mass``): round/oval (circumscribed or ill-defined) or spiculated, 5-25 mm;
* calcification cluster (``mg_calcification``): 5-20 specks of 0.3-0.8 mm within a disc of
  4-12 mm; some images also carry 1-2 isolated specks (benign, not a cluster) as distractors.

Ground-truth boxes are in source pixels, end exclusive. The display image is turned into
stored values as a modality would (`mosmedai.phantoms.chest_xray._to_stored`: Bits Stored
12-14, a LINEAR window or none, sometimes MONOCHROME1), and every network input comes from
`mosmedai.catalog.imaging.preprocess`, the serving path's own function.

Reference phantoms on synthetic data; not for clinical use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from mosmedai.catalog.imaging import GrayscaleParams, Letterbox, VoiFunction, preprocess
from mosmedai.phantoms.chest_xray import _bbox, _blur, _smoothstep, _to_stored

DETECTION_TOOLS = ("mg_mass", "mg_calcification")

#: Long side, pixels, at which the anatomy is drawn; larger images are upsampled from it
#: (noise added at full size). The network sees 256 pixels.
RENDER_MAX = 512
#: SOP Class Digital Mammography X-Ray Image Storage - For Presentation (PS3.4 B.5).
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
#: Density category bounds on the fibroglandular share of the breast.
DENSITY_BOUNDS = (0.25, 0.5, 0.75)

Seed = int | Sequence[int]
Box = tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic mammogram as stored, with its ground truth.

    boxes[tool] (row0, col0, row1, col1) in source pixels, end exclusive, or None; masks[tool]
    the finding's mask (mass: its core; calcification: the cluster's box). ``category`` is
    the ACR density index 0..3, ``dense_fraction`` the fibroglandular share of the breast.
    """

    stored: np.ndarray
    params: GrayscaleParams
    pixel_spacing_mm: float
    bits_stored: int
    laterality: str  # "L" or "R"
    view: str  # "CC" or "MLO"
    labels: dict[str, bool]
    boxes: dict[str, Box | None]
    masks: dict[str, np.ndarray | None] = field(repr=False)
    category: int = 0
    dense_fraction: float = 0.0
    sizes_mm: dict[str, float] = field(default_factory=dict)  # mass diameter, cluster diameter
    details: dict[str, object] = field(default_factory=dict)  # mass shape, speck count
    seed: Seed = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.stored.shape  # type: ignore[return-value]

    @property
    def photometric_interpretation(self) -> str:
        return "MONOCHROME1" if self.params.invert else "MONOCHROME2"


# --------------------------------------------------------------------------------------
# drawing (canonical frame: chest wall at column 0, as a left breast)


def _speck_layer(shape: tuple[int, int], specks: list[tuple[float, float, float, float]], spacing: float) -> np.ndarray:
    """Tiny bright specks (row_mm, col_mm, diameter_mm, contrast), drawn area-true: a speck
    smaller than a pixel adds its contrast times its share of the pixel, spread over a
    Gaussian of at least half a pixel, so the network input sees the same at any resolution."""
    layer = np.zeros(shape, np.float32)
    rows, cols = shape
    for r_mm, c_mm, d_mm, contrast in specks:
        sigma_true = d_mm / 2.5
        sigma = max(sigma_true / spacing, 0.5)  # pixels
        amplitude = contrast * (sigma_true / spacing) ** 2 / sigma**2
        cr, cc = r_mm / spacing - 0.5, c_mm / spacing - 0.5
        k = int(math.ceil(3 * sigma))
        r0, r1 = max(0, int(cr) - k), min(rows, int(cr) + k + 2)
        c0, c1 = max(0, int(cc) - k), min(cols, int(cc) + k + 2)
        if r0 >= r1 or c0 >= c1:
            continue
        rr = np.arange(r0, r1, dtype=np.float32)[:, None] - cr
        ccs = np.arange(c0, c1, dtype=np.float32)[None, :] - cc
        layer[r0:r1, c0:c1] += np.float32(amplitude) * np.exp(-(rr**2 + ccs**2) / (2 * sigma**2))
    return layer


def _draw(rng: np.random.Generator, rng_find: np.random.Generator, shape: tuple[int, int], spacing: float,
          view: str, present: dict[str, bool], category: int) -> dict:
    rows, cols = shape
    height_mm, width_mm = rows * spacing, cols * spacing
    y = ((np.arange(rows, dtype=np.float32) + 0.5) * spacing)[:, None]
    x = ((np.arange(cols, dtype=np.float32) + 0.5) * spacing)[None, :]

    # ---- breast outline: a semi-ellipse against the chest wall, wobbly skin edge
    depth = rng.uniform(0.5, 0.85) * width_mm
    if view == "CC":
        centre = rng.uniform(0.42, 0.58) * height_mm
        half_top = half_bottom = rng.uniform(0.3, 0.42) * height_mm
    else:  # MLO: the breast hangs lower and reaches up into the axilla along the chest wall
        centre = rng.uniform(0.5, 0.62) * height_mm
        half_top = centre + rng.uniform(0.0, 0.05) * height_mm
        half_bottom = rng.uniform(0.3, 0.4) * height_mm
    half = np.where(y < centre, half_top, half_bottom).astype(np.float32)
    angle = np.arctan2((y - centre) / half, x / depth)
    wobble = 1.0 + sum(rng.uniform(-0.025, 0.025) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    radius = np.sqrt(((y - centre) / half) ** 2 + (x / depth) ** 2) / wobble
    breast = radius <= 1.0
    pectoral = np.zeros(shape, bool)
    if view == "MLO":
        pec_w = rng.uniform(0.22, 0.4) * width_mm
        pec_h = rng.uniform(0.35, 0.6) * height_mm
        bulge = rng.uniform(0.0, 0.08)
        t = x / pec_w + y / pec_h
        pectoral = t <= 1.0 + bulge * np.sin(np.pi * np.clip(y / pec_h, 0, 1))
        breast = breast | (pectoral & (y < centre))
    body = breast.copy()
    tissue = breast & ~pectoral
    distance = cv2.distanceTransform(np.pad(breast, ((0, 0), (1, 0)), constant_values=True).astype(np.uint8)
                                     [:, 1:].copy(), cv2.DIST_L2, 5) * spacing  # mm to the skin (chest wall open)
    distance = distance.astype(np.float32)

    # ---- fat, thinning towards the skin
    background = rng.uniform(0.01, 0.05)
    fat = rng.uniform(0.28, 0.38)
    edge_mm = rng.uniform(6.0, 14.0)
    profile = _smoothstep(distance / edge_mm) * breast
    image = background + (fat - background) * (0.25 + 0.75 * profile) * breast
    image = np.where(breast, image, background).astype(np.float32)

    # ---- fibroglandular tissue: a textured field, its top share (the density) made dense
    if category == 0:
        fraction = rng.uniform(0.04, 0.22)
    elif category == 3:
        fraction = rng.uniform(0.78, 0.92)
    else:
        fraction = rng.uniform(category * 0.25 + 0.03, category * 0.25 + 0.22)
    # The field is drawn on a coarse grid (2 mm) and upsampled: the structure is coarse anyway.
    coarse = (max(8, int(round(height_mm / 2.0))), max(8, int(round(width_mm / 2.0))))
    noise = rng.standard_normal(coarse, dtype=np.float32)
    field_small = np.zeros(coarse, np.float32)
    for sigma_mm, weight in ((2.5, 0.35), (7.0, 0.6), (18.0, 1.0)):
        # Blurred more towards the nipple (columns) than across: streaks of ducts and lobules.
        blurred = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma_mm, sigmaY=sigma_mm / 2.0)
        field_small += weight * blurred / max(float(blurred.std()), 1e-6)
    field_ = cv2.resize(field_small, (cols, rows), interpolation=cv2.INTER_CUBIC)
    field_ += 1.6 * _smoothstep(distance / 25.0)  # glands sit inside, away from the subcutaneous fat
    field_ -= 4.0 * (distance < 3.0)
    inside = field_[tissue]
    level = float(np.quantile(inside, 1.0 - fraction)) if inside.size else 0.0
    dense = (field_ >= level) & tissue
    actual = float(dense.sum() / max(1, tissue.sum()))
    gland = rng.uniform(0.2, 0.3)
    fine = _blur(rng.standard_normal(shape, dtype=np.float32), 1.2 / spacing)
    fine /= max(float(fine.std()), 1e-6)
    # Graded: tissue well above the level is denser than tissue at its edge.
    dense_soft = _smoothstep((field_ - level) / 0.5 + 0.5) * tissue
    dense_soft = _blur(dense_soft.astype(np.float32), 1.0 / spacing)
    image += gland * dense_soft * (0.9 + 0.04 * fine) * (0.5 + 0.5 * profile)
    # a little structure in the fat too (Cooper's ligaments, vessels)
    image += 0.006 * fine * profile

    # ---- pectoral muscle (MLO) and skin line
    if pectoral.any():
        muscle = _blur(pectoral.astype(np.float32), 1.5 / spacing) * breast
        image += rng.uniform(0.3, 0.4) * muscle
    skin_mm = rng.uniform(0.8, 1.8)
    skin = breast & (distance < skin_mm / 0.8)
    image += rng.uniform(0.06, 0.12) * _blur(skin.astype(np.float32), 0.4 / spacing)

    masks: dict[str, np.ndarray | None] = {tool: None for tool in DETECTION_TOOLS}
    sizes: dict[str, float] = {}
    details: dict[str, object] = {}
    candidates = tissue & (distance > 8.0) & (x > 8.0)

    def pick(margin_mm: float) -> tuple[float, float] | None:
        ok = np.flatnonzero((tissue & (distance > margin_mm) & (x > margin_mm)).ravel())
        if ok.size == 0:
            ok = np.flatnonzero(candidates.ravel())
            if ok.size == 0:
                return None
        index = int(ok[rng_find.integers(ok.size)])
        r, c = divmod(index, cols)
        return (r + 0.5) * spacing, (c + 0.5) * spacing

    # ---- mass
    if present["mg_mass"]:
        diameter = rng_find.uniform(5.0, 25.0)
        spiculated = bool(rng_find.random() < 0.5)
        point = pick(diameter / 2.0 + 3.0)
        if point is not None:
            cy, cx = point
            ratio = rng_find.uniform(0.7, 1.0)
            theta = rng_find.uniform(0, np.pi)
            a, b = diameter / 2.0, diameter / 2.0 * ratio
            dy, dx = y - cy, x - cx
            u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
            v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
            q = u * u + v * v
            core = q <= 1.0
            ill_defined = (not spiculated) and rng_find.random() < 0.4
            edge = rng_find.uniform(1.2, 2.5) if ill_defined else rng_find.uniform(0.3, 0.8)
            blob = np.sqrt(np.clip(1.0 - q, 0.0, 1.0)) * 0.6 + 0.4 * core
            blob = _blur(blob.astype(np.float32), edge / spacing)
            contrast = rng_find.uniform(0.28, 0.42)  # denser than glandular tissue
            image += contrast * blob
            if spiculated:
                lines = np.zeros(shape, np.uint8)
                for _ in range(int(rng_find.integers(7, 16))):
                    phi = rng_find.uniform(0, 2 * np.pi)
                    length = a * rng_find.uniform(1.5, 2.6)
                    r0, c0 = cy + a * 0.6 * np.sin(phi), cx + a * 0.6 * np.cos(phi)
                    r1, c1 = cy + length * np.sin(phi), cx + length * np.cos(phi)
                    cv2.line(lines, (int(c0 / spacing), int(r0 / spacing)), (int(c1 / spacing), int(r1 / spacing)),
                             255, thickness=max(1, int(round(rng_find.uniform(0.4, 0.9) / spacing))))
                image += contrast * 0.7 * _blur(lines.astype(np.float32) / 255.0, 0.4 / spacing) * breast
            core[min(rows - 1, int(cy / spacing)), min(cols - 1, int(cx / spacing))] = True
            masks["mg_mass"] = core
            sizes["mg_mass"] = float(diameter)
            details["mass_shape"] = "spiculated" if spiculated else ("ill-defined" if ill_defined else "circumscribed")

    # ---- calcification cluster (and sometimes isolated benign specks)
    specks: list[tuple[float, float, float, float]] = []
    if present["mg_calcification"]:
        extent = rng_find.uniform(4.0, 12.0)  # cluster diameter, mm
        point = pick(extent / 2.0 + 4.0)
        if point is not None:
            cy, cx = point
            count = int(rng_find.integers(5, 21))
            radius_c = extent / 2.0 * np.sqrt(rng_find.uniform(0, 1, count))
            phi = rng_find.uniform(0, 2 * np.pi, count)
            cluster = [(cy + r * np.sin(p), cx + r * np.cos(p), rng_find.uniform(0.3, 0.8), rng_find.uniform(0.6, 1.0))
                       for r, p in zip(radius_c, phi)]
            specks += cluster
            r_lo = min(s[0] - s[2] / 2 for s in cluster)
            r_hi = max(s[0] + s[2] / 2 for s in cluster)
            c_lo = min(s[1] - s[2] / 2 for s in cluster)
            c_hi = max(s[1] + s[2] / 2 for s in cluster)
            box = (max(0, int(math.floor(r_lo / spacing))), max(0, int(math.floor(c_lo / spacing))),
                   min(rows, int(math.ceil(r_hi / spacing))), min(cols, int(math.ceil(c_hi / spacing))))
            mask = np.zeros(shape, bool)
            mask[box[0]:box[2], box[1]:box[3]] = True
            masks["mg_calcification"] = mask
            sizes["mg_calcification"] = float(max(r_hi - r_lo, c_hi - c_lo))
            details["speck_count"] = count
    if rng_find.random() < 0.2:  # isolated benign specks, far apart
        for _ in range(int(rng_find.integers(1, 3))):
            point = pick(5.0)
            if point is not None:
                specks.append((point[0], point[1], rng_find.uniform(0.3, 0.9), rng_find.uniform(0.4, 0.8)))
    if specks:
        image += _speck_layer(shape, specks, spacing) * breast

    # ---- slow exposure variation, detector blur
    coarse = (max(4, rows // 16), max(4, cols // 16))
    slow = cv2.resize(_blur(rng.standard_normal(coarse, dtype=np.float32), 2.0), (cols, rows),
                      interpolation=cv2.INTER_LINEAR)
    image += rng.uniform(0.005, 0.015) * slow / max(float(slow.std()), 1e-6) * breast
    image = _blur(image.astype(np.float32), rng.uniform(0.05, 0.12) / spacing)
    return dict(image=np.clip(image, 0.0, 1.0), masks=masks, sizes=sizes, details=details, body=body,
                fraction=actual)


def density_category_of(fraction: float) -> int:
    """ACR category index (0..3 = a..d) of a fibroglandular share of the breast."""
    return int(np.searchsorted(DENSITY_BOUNDS, fraction, side="right"))


def make_phantom(seed: Seed, *, shape: tuple[int, int] | None = None, laterality: str | None = None,
                 view: str | None = None, findings: Sequence[str] | None = None, category: int | None = None,
                 prevalence: float = 0.5, monochrome1: bool | None = None, voi: VoiFunction | None = None,
                 extras: bool | None = None) -> Phantom:
    """One phantom, deterministic from `seed` and the arguments.

    shape (rows, columns): default random, rows 440-512, columns rows / 1.18-1.32 (portrait
    detectors); pixel spacing is the field of view (rows: 230-300 mm) over the rows.
    findings: the detection tools whose finding is drawn (default each with `prevalence`);
    category: density index 0..3 (default uniform); laterality "L"/"R", view "CC"/"MLO",
    monochrome1, voi (LINEAR or AUTO), extras (burnt-in label): default random.
    """
    root = np.random.SeedSequence(list(seed) if isinstance(seed, Sequence) else seed)
    rng_shape, rng_anatomy, rng_find, rng_header, rng_noise = (np.random.default_rng(s) for s in root.spawn(5))
    chance = rng_find.random(len(DETECTION_TOOLS))
    if findings is None:
        present = {tool: bool(p < prevalence) for tool, p in zip(DETECTION_TOOLS, chance)}
    else:
        unknown = set(findings) - set(DETECTION_TOOLS)
        if unknown:
            raise ValueError(f"unknown findings {sorted(unknown)}; known: {DETECTION_TOOLS}")
        present = {tool: tool in findings for tool in DETECTION_TOOLS}
    drawn_category = int(rng_anatomy.integers(0, 4))
    category = drawn_category if category is None else int(category)
    drawn_side, drawn_view = ("L", "R")[int(rng_shape.integers(2))], ("CC", "MLO")[int(rng_shape.integers(2))]
    laterality = laterality or drawn_side
    view = view or drawn_view
    if laterality not in ("L", "R") or view not in ("CC", "MLO"):
        raise ValueError(f"laterality {laterality!r} / view {view!r}: expected L/R and CC/MLO")

    long_side = int(rng_shape.integers(440, 513))
    aspect = rng_shape.uniform(1.18, 1.32)
    fov = rng_shape.uniform(230.0, 300.0)
    if shape is None:
        shape = (long_side, int(round(long_side / aspect)))
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 64 or cols < 64:
        raise ValueError(f"shape {shape} is too small for a mammogram (64 pixels at least)")
    spacing = round(fov / rows, 5)

    factor = min(1.0, RENDER_MAX / max(rows, cols))
    render_shape = (max(64, round(rows * factor)), max(64, round(cols * factor)))
    render_spacing = spacing * rows / render_shape[0]
    drawn = _draw(rng_anatomy, rng_find, render_shape, render_spacing, view, present, category)
    image, masks, body = drawn["image"], drawn["masks"], drawn["body"]
    if render_shape != (rows, cols):
        image = cv2.resize(image, (cols, rows), interpolation=cv2.INTER_LINEAR)
        body = cv2.resize(body.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST).astype(bool)
        masks = {tool: None if m is None else
                 cv2.resize(m.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST).astype(bool)
                 for tool, m in masks.items()}
    if laterality == "R":  # chest wall on the image's right
        image, body = image[:, ::-1], body[:, ::-1]
        masks = {tool: None if m is None else m[:, ::-1] for tool, m in masks.items()}

    image = image + rng_noise.uniform(0.003, 0.01) * rng_noise.standard_normal((rows, cols), dtype=np.float32)
    label_mask = np.zeros((rows, cols), bool)
    if (rng_header.random() < 0.4) if extras is None else extras:  # burnt-in "L CC" on the axillary side
        height = max(8, rows // 30)
        top = int(rows * 0.03)
        left = int(cols * 0.72) if laterality == "L" else int(cols * 0.06)
        cv2.putText(image, f"{laterality} {view}", (left, top + height), cv2.FONT_HERSHEY_SIMPLEX, height / 24.0,
                    0.9, max(1, height // 8))
        label_mask[top: top + 2 * height, left: left + 5 * height] = True
    image = np.clip(image, 0.0, 1.0).astype(np.float32)

    bits = int(rng_header.integers(12, 15))
    invert = bool(rng_header.random() < 0.1) if monochrome1 is None else bool(monochrome1)
    function = (VoiFunction.LINEAR if rng_header.random() < 0.6 else VoiFunction.AUTO) if voi is None else voi
    stored, params, bits = _to_stored(rng_header, image, body & ~label_mask, bits, invert, (1.0, 0.0), function)
    labels = {tool: masks[tool] is not None for tool in DETECTION_TOOLS}
    boxes = {tool: None if masks[tool] is None else _bbox(masks[tool]) for tool in DETECTION_TOOLS}
    fraction = drawn["fraction"]
    return Phantom(stored, params, spacing, bits, laterality, view, labels, boxes, masks,
                   density_category_of(fraction), fraction, drawn["sizes"], drawn["details"], seed)


def network_input(phantom: Phantom) -> tuple[np.ndarray, Letterbox]:
    """The network's input for a phantom: always through `mosmedai.catalog.imaging.preprocess`."""
    return preprocess(phantom.stored, phantom.params)


VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
#: Patient Orientation (row direction, column direction) for each laterality and view:
#: left breast - columns run towards anterior (chest wall on the left).
PATIENT_ORIENTATION = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
                       ("L", "MLO"): ["A", "FR"], ("R", "MLO"): ["P", "FL"]}


def to_dataset(phantom: Phantom, **attributes):
    """The phantom as a Digital Mammography X-Ray Image - For Presentation dataset."""
    from pydicom.dataset import Dataset

    from mosmedai.phantoms.dicom_build import build_dataset
    from mosmedai.phantoms.chest_xray import _ds

    seed_text = "-".join(str(s) for s in phantom.seed) if isinstance(phantom.seed, Sequence) else str(phantom.seed)
    spacing = [_ds(round(phantom.pixel_spacing_mm, 6))] * 2
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (VIEW_CODES[phantom.view][0], "SCT",
                                                                     VIEW_CODES[phantom.view][1])
    header = dict(
        AccessionNumber="", StudyID="1", SeriesNumber=1, InstanceNumber=1,
        Manufacturer="mosmedai phantom", ReferringPhysicianName="",
        PatientName=f"PHANTOM^{seed_text}", PatientID=f"PHANTOM-{seed_text}", PatientBirthDate="", PatientSex="F",
        BodyPartExamined="BREAST", ViewPosition=phantom.view, ImageLaterality=phantom.laterality,
        ViewCodeSequence=[code], PatientOrientation=PATIENT_ORIENTATION[(phantom.laterality, phantom.view)],
        ImageType=["ORIGINAL", "PRIMARY"], PresentationIntentType="FOR PRESENTATION",
        SeriesDescription=f"MAMMO {phantom.laterality} {phantom.view} (synthetic phantom)",
        BurnedInAnnotation="NO", BreastImplantPresent="NO", PixelIntensityRelationship="LOG",
        PixelIntensityRelationshipSign=-1 if phantom.params.invert else 1,
        RescaleSlope="1", RescaleIntercept="0", RescaleType="US",
        PixelSpacing=spacing, ImagerPixelSpacing=spacing, LossyImageCompression="00",
    )
    if phantom.params.voi_function != VoiFunction.AUTO and phantom.params.window_width > 0:
        header.update(WindowCenter=_ds(phantom.params.window_center), WindowWidth=_ds(phantom.params.window_width),
                      VOILUTFunction=phantom.params.voi_function.name)
    header.update(attributes)
    ds = build_dataset(np.ascontiguousarray(phantom.stored, dtype=np.uint16), modality="MG",
                       bits_stored=phantom.bits_stored, photometric=phantom.photometric_interpretation, **header)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    ds["PixelData"].VR = "OW"
    return ds
