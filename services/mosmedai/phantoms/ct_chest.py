"""Synthetic chest CT with known findings, for the chest CT tools.

This module owns the phantoms (`make_phantom`, `ChestPhantom`: the anatomy, its rendering in
Hounsfield units and its ground truth); the network data, training, evaluation, the model
cards and the cases are in ``mosmedai_training.ct_chest``.

Phantoms (`ChestPhantom`): an axial chest CT in Hounsfield units, slice 0 at the feet. The
anatomy is drawn in coordinates relative to the field of view (the body fills it, whatever
the matrix and pixel spacing), findings in millimetres: air outside the body (-1000 HU), a
body ellipse of soft tissue (+40) under a fat layer (-100), two lungs (parenchyma about
-860 HU with a gravity gradient and vessel trees of +30 HU), the heart (+30..+45) in an
epicardial fat shell, the descending aorta, a sternum and the spine: vertebral bodies with a
cortical rim and endplates (~+700) around cancellous bone whose HU (50-300) is set per case,
intervertebral discs (+80), posterior elements. Gaussian noise (15-28 HU) everywhere.
Findings, each present independently (`FINDING_RATE`):

* COVID-19-type involvement: ground-glass / consolidation (-700..-300 HU) in a smooth random
  field thresholded at a target share (1-90 %) of the lung volume, peripheral and basal;
* a solid nodule: a sphere 5-30 mm across (capped by the lung's size), 0..+60 HU;
* emphysema: low-attenuation regions (mean -980..-960 HU) over 2-45 % of the lungs, upper zones;
* coronary calcium: 1-12 plaques (2-9 mm, peak 150-1000 HU) on coronary paths on the heart.

A phantom is a function of continuous coordinates plus noise, so it can be rendered at any
set of source voxels: `render()` draws the whole source volume (cases, held-out evaluation);
`grid_sample()` draws only the source voxels that `mosmedai.catalog.volumes.to_grid` would pick - the
same network input in distribution at a fraction of the cost (training, calibration).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mosmedai.catalog import volumes
from mosmedai.catalog.families import ct_chest as family
from mosmedai.catalog.families.ct_chest import GRID

FINDINGS = ("covid", "nodule", "emphysema", "cac")
#: Share of phantoms with each finding (independently).
FINDING_RATE = {"covid": 0.5, "nodule": 0.5, "emphysema": 0.45, "cac": 0.65}
#: Source size ranges for cases and held-out phantoms (the lead's benchmark asks for more).
SLICES = (40, 64)
MATRIX = (192, 256)
SLICE_SPACING_MM = (1.0, 5.0)
PIXEL_SPACING_MM = (0.6, 0.9)

Seed = int | tuple[int, ...]


# ======================================================================================
# phantoms


def _linear_weights(t: np.ndarray, n: int) -> np.ndarray:
    """Weights [len(t), n] of linear interpolation at t in [0, 1] over n knots."""
    position = np.clip(t, 0.0, 1.0) * (n - 1)
    low = np.minimum(np.floor(position).astype(int), n - 2)
    frac = position - low
    weights = np.zeros((len(t), n), np.float32)
    weights[np.arange(len(t)), low] = 1.0 - frac
    weights[np.arange(len(t)), low + 1] = frac
    return weights


def _field(coarse: np.ndarray, w: np.ndarray, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A coarse random lattice interpolated (trilinear) at w in [0,1], v and u in [-1,1]."""
    nz, ny, nx = coarse.shape
    f = np.tensordot(coarse, _linear_weights((u + 1) / 2, nx), axes=([2], [1]))  # nz, ny, X
    f = np.tensordot(f, _linear_weights((v + 1) / 2, ny), axes=([1], [1]))  # nz, X, Y
    f = np.tensordot(f, _linear_weights(w, nz), axes=([0], [1]))  # X, Y, Z
    return np.ascontiguousarray(f.transpose(2, 1, 0), np.float32)


@dataclass
class ChestPhantom:
    """One synthetic chest CT with its ground truth, drawable at any source voxels."""

    seed: Seed
    shape: tuple[int, int, int]  # source slices, rows, columns
    spacing_mm: tuple[float, float, float]  # slice, row, column spacing
    findings: dict[str, bool]
    params: dict = field(repr=False)

    # --- coordinates ---------------------------------------------------------------
    @property
    def extent_mm(self) -> np.ndarray:
        return np.array(self.shape, float) * np.array(self.spacing_mm, float)

    def rel_to_mm(self, w: float, v: float, u: float) -> np.ndarray:
        """Relative (w in [0,1] feet->head, v, u in [-1,1]) -> (z, y, x) mm from the volume corner."""
        ez, ey, ex = self.extent_mm
        return np.array([w * ez, (v + 1) / 2 * ey, (u + 1) / 2 * ex])

    def _coords(self, zi, yi, xi):
        zi, yi, xi = (np.asarray(a) for a in (zi, yi, xi))
        (sz, sy, sx), (dz, dy, dx) = self.shape, self.spacing_mm
        w = ((zi + 0.5) / sz).astype(np.float32)
        v = (((yi + 0.5) / sy) * 2 - 1).astype(np.float32)
        u = (((xi + 0.5) / sx) * 2 - 1).astype(np.float32)
        mm = ((zi + 0.5) * dz, (yi + 0.5) * dy, (xi + 0.5) * dx)
        return w, v, u, mm

    # --- anatomy (relative coordinates) ----------------------------------------------
    def anatomy(self, w: np.ndarray, v: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
        p = self.params
        W, V, U = w[:, None, None], v[None, :, None], u[None, None, :]
        half_y, half_x = self.extent_mm[1] / 2, self.extent_mm[2] / 2
        bx, by = p["body"]
        body = (U / bx) ** 2 + ((V - 0.02) / by) ** 2 <= 1.0
        fat = p["fat"]
        inner = (U / (bx - fat)) ** 2 + ((V - 0.02) / (by - fat)) ** 2 <= 1.0
        hc, ha = p["heart_centre"], p["heart_axes"]
        heart_r = ((U - hc[2]) / ha[2]) ** 2 + ((V - hc[1]) / ha[1]) ** 2 + ((W - hc[0]) / ha[0]) ** 2
        heart = heart_r <= 1.0
        shell = heart_r <= p["shell"] ** 2
        sx_, sy_ = p["vb_centre"]
        ax_, ay_ = p["vb_axes"]
        vb_r = ((U - sx_) / ax_) ** 2 + ((V - sy_) / ay_) ** 2
        rim = p["rim_mm"]
        vb_inner_r = ((U - sx_) / (ax_ - rim / half_x)) ** 2 + ((V - sy_) / (ay_ - rim / half_y)) ** 2
        phase = ((W - p["vert_phase"]) / p["vert_period"]) % 1.0
        in_body_z = (phase < p["vert_body_share"]) & (W > 0.0)
        plate = p["plate_share"]
        in_core_z = (phase >= plate) & (phase < p["vert_body_share"] - plate)
        vertebra = (vb_r <= 1.0) & in_body_z
        cancellous = (vb_inner_r <= 1.0) & in_core_z
        disc = (vb_r <= 1.0) & ~in_body_z
        posterior = ((U - sx_) / 0.07) ** 2 + ((V - (sy_ + ay_ + 0.07)) / 0.06) ** 2 <= 1.0
        aorta = ((U - p["aorta"][0]) / 0.075) ** 2 + ((V - p["aorta"][1]) / 0.075) ** 2 <= 1.0
        sternum = (U / 0.07) ** 2 + ((V + by - 0.06) / 0.03) ** 2 <= 1.0
        lungs = np.zeros(np.broadcast_shapes(W.shape, V.shape, U.shape), bool)
        for (cu, cv), (au, av), (w0, w1) in zip(p["lung_centres"], p["lung_axes"], p["lung_z"]):
            t = (W - (w0 + w1) / 2) / ((w1 - w0) / 2)
            profile = np.sqrt(np.clip(np.where(t > 0, 1 - t**2, 1 - t**6), 0.0, 1.0))
            lungs |= ((U - cu) / au) ** 2 + ((V - cv) / av) ** 2 <= profile**2
        lung = lungs & inner & ~(heart_r <= (p["shell"] + 0.05) ** 2) & (vb_r > 1.3) & ~aorta & ~posterior
        out = {"body": body, "inner": inner, "heart": heart, "shell": shell, "vertebra": vertebra,
               "cancellous": cancellous, "disc": disc, "posterior": posterior, "aorta": aorta,
               "sternum": sternum, "lung": lung}
        return {k: np.broadcast_to(m, lungs.shape) for k, m in out.items()}

    # --- rendering --------------------------------------------------------------------
    def grid_sample(self, grid: tuple[int, int, int] = GRID, noise: bool = True):
        """The phantom at the source voxels `volumes.to_grid` picks for ``grid``."""
        return self.render(*(volumes.sample_indices(s, g) for s, g in zip(self.shape, grid)), noise=noise)

    def render(self, zi=None, yi=None, xi=None, noise: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """HU float32 [len(zi), len(yi), len(xi)] at source voxel indices (default: all) and
        the truth masks there: lung, lesion, nodule, heart (heart region), calcium, vertebra."""
        zi = np.arange(self.shape[0]) if zi is None else np.asarray(zi)
        yi = np.arange(self.shape[1]) if yi is None else np.asarray(yi)
        xi = np.arange(self.shape[2]) if xi is None else np.asarray(xi)
        p = self.params
        rng = np.random.default_rng([*np.atleast_1d(self.seed), 77, len(zi), len(yi), len(xi)])
        w, v, u, mm = self._coords(zi, yi, xi)
        a = self.anatomy(w, v, u)
        shape = a["lung"].shape
        hu = np.full(shape, -1000.0, np.float32)
        hu[a["body"]] = -100.0  # fat
        hu[a["inner"]] = p["soft_hu"]
        hu[a["aorta"]] = p["blood_hu"]
        hu[a["shell"]] = -100.0  # epicardial fat
        hu[a["heart"]] = p["blood_hu"]
        hu[a["disc"]] = 80.0
        hu[a["vertebra"]] = p["cortex_hu"]
        hu[a["cancellous"]] = p["bone_hu"]
        hu[a["posterior"] & a["inner"]] = p["cortex_hu"] - 200.0
        hu[a["sternum"] & a["inner"]] = 300.0
        lung = a["lung"]
        gradient = p["lung_hu"] + 25.0 * v[None, :, None] + np.zeros(shape, np.float32)
        hu[lung] = gradient[lung]
        masks = {"lung": lung, "heart": a["shell"] & ~lung, "vertebra": a["vertebra"],
                 "lesion": np.zeros(shape, bool), "nodule": np.zeros(shape, bool), "calcium": np.zeros(shape, bool)}
        if self.findings["emphysema"]:
            region = lung & (_field(p["emph_field"], w, v, u) + p["emph_bias"] * w[:, None, None] > p["emph_threshold"])
            hu[region] = p["emph_hu"]
        if self.findings["covid"]:
            f = _field(p["covid_field"], w, v, u) + self._covid_bias(w, v, u)
            lesion = lung & (f > p["covid_threshold"])
            density = 1.0 / (1.0 + np.exp(-_field(p["covid_density"], w, v, u)))
            hu[lesion] = (-700.0 + 400.0 * density)[lesion]
            masks["lesion"] = lesion
        for start, end, radius in p["vessels"]:
            self._paint_capsule(hu, mm, start, end, radius, p["blood_hu"], within=lung)
        if self.findings["nodule"]:
            centre, diameter = p["nodule_centre"], p["nodule_mm"]
            masks["nodule"] = self._paint_ellipsoid(hu, mm, centre, (diameter / 2,) * 3, p["nodule_hu"])
        if self.findings["cac"]:
            for centre, radii, peak in p["plaques"]:
                masks["calcium"] |= self._paint_ellipsoid(hu, mm, centre, radii, peak)
        if noise:
            hu += rng.normal(0.0, p["noise"], shape).astype(np.float32)
        return hu, masks

    def _covid_bias(self, w, v, u):
        """Peripheral and basal preference of COVID-19 involvement."""
        W, V, U = w[:, None, None], v[None, :, None], u[None, None, :]
        return 0.9 * (np.abs(U) - 0.4) + 0.4 * V - 0.8 * W

    def _box(self, mm, centre, radii):
        """Index ranges (into the rendered axes) of voxels within centre +- radii (mm)."""
        out = []
        for axis in range(3):
            coordinate = mm[axis]
            lo = np.searchsorted(coordinate, centre[axis] - radii[axis], "left")
            hi = np.searchsorted(coordinate, centre[axis] + radii[axis], "right")
            out.append(slice(lo, hi))
        return tuple(out)

    def _paint_ellipsoid(self, hu, mm, centre, radii, value) -> np.ndarray:
        mask = np.zeros(hu.shape, bool)
        box = self._box(mm, centre, radii)
        if any(s.stop <= s.start for s in box):
            return mask
        z, y, x = (mm[axis][box[axis]] for axis in range(3))
        local = (((z[:, None, None] - centre[0]) / radii[0]) ** 2 + ((y[None, :, None] - centre[1]) / radii[1]) ** 2
                 + ((x[None, None, :] - centre[2]) / radii[2]) ** 2) <= 1.0
        hu[box][local] = value
        mask[box] = local
        return mask

    def _paint_capsule(self, hu, mm, start, end, radius, value, within) -> None:
        start, end = np.asarray(start), np.asarray(end)
        lo, hi = np.minimum(start, end) - radius, np.maximum(start, end) + radius
        box = self._box(mm, (lo + hi) / 2, (hi - lo) / 2)
        if any(s.stop <= s.start for s in box):
            return
        z, y, x = (mm[axis][box[axis]] for axis in range(3))
        P = np.stack(np.broadcast_arrays(z[:, None, None], y[None, :, None], x[None, None, :]), axis=-1)
        d = end - start
        t = np.clip(((P - start) @ d) / max(float(d @ d), 1e-9), 0.0, 1.0)
        distance = np.linalg.norm(P - start - t[..., None] * d, axis=-1)
        local = (distance <= radius) & within[box]
        hu[box][local] = value

    # --- ground truth -------------------------------------------------------------------
    def truth(self, hu: np.ndarray | None = None, masks: dict | None = None) -> dict:
        """Ground truth on the SOURCE volume (render it, or pass a full render)."""
        if hu is None:
            hu, masks = self.render()
        p = self.params
        dz, dy, dx = self.spacing_mm
        lung = masks["lung"]
        n_lung = max(1, int(lung.sum()))
        truth = {
            "seed": list(np.atleast_1d(self.seed).tolist()),
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing_mm),
            "findings": dict(self.findings),
            "involvement_percent": 100.0 * float((masks["lesion"] & lung).sum()) / n_lung,
            "laa950_percent": 100.0 * float((hu[lung] < family.EMPHYSEMA_HU).sum()) / n_lung,
            "vertebral_hu": float(p["bone_hu"]),
            "calcium_score": family.agatston(hu, masks["calcium"] & (hu >= family.CALCIUM_HU), dy * dx, dz),
        }
        truth["ct_category"] = family.covid_category(truth["involvement_percent"]) if self.findings["covid"] else 0
        truth["cac_category"] = family.cac_category(truth["calcium_score"])
        if self.findings["nodule"]:
            c, d = p["nodule_centre"], p["nodule_mm"]
            r = d / 2
            truth["nodule_diameter_mm"] = float(d)
            truth["nodule_slice"] = int(min(self.shape[0] - 1, c[0] // dz))
            truth["nodule_slice_halfwidth"] = max(1, int(math.ceil(r / dz)))
            truth["nodule_box"] = [(c[1] - r) / dy, (c[2] - r) / dx, (c[1] + r) / dy, (c[2] + r) / dx]
        return truth

    def labels(self) -> dict[str, bool]:
        t = self.truth()
        return {"ctc_covid": t["involvement_percent"] > 0, "ctc_nodule": self.findings["nodule"],
                "ctc_emphysema": t["laa950_percent"] >= family.EMPHYSEMA_POSITIVE_PERCENT,
                "ctc_cac": t["calcium_score"] > 0, "ctc_bone_density": t["vertebral_hu"] < family.BONE_POSITIVE_HU}


def make_phantom(seed: Seed, findings: dict[str, bool] | None = None,
                 shape: tuple[int, int, int] | None = None,
                 spacing_mm: tuple[float, float, float] | None = None) -> ChestPhantom:
    """A phantom deterministic from ``seed``; ``shape`` (slices, rows, columns) and
    ``spacing_mm`` override the drawn size (e.g. a 128 x 512 x 512 benchmark series)."""
    rng = np.random.default_rng(list(np.atleast_1d(seed)))
    drawn = {name: bool(rng.random() < FINDING_RATE[name]) for name in FINDINGS}
    findings = {**drawn, **(findings or {})}
    slices = int(rng.integers(SLICES[0], SLICES[1] + 1))
    matrix = int(rng.integers(MATRIX[0], MATRIX[1] + 1))
    dz = float(np.round(rng.uniform(*SLICE_SPACING_MM), 2))
    dxy = float(np.round(rng.uniform(*PIXEL_SPACING_MM), 3))
    shape = tuple(int(s) for s in (shape or (slices, matrix, matrix)))
    spacing_mm = tuple(float(s) for s in (spacing_mm or (dz, dxy, dxy)))
    p: dict = {}
    p["body"] = (rng.uniform(0.84, 0.92), rng.uniform(0.6, 0.68))
    p["fat"] = rng.uniform(0.03, 0.08)
    p["soft_hu"] = rng.uniform(30, 50)
    p["blood_hu"] = rng.uniform(30, 45)
    p["lung_hu"] = rng.uniform(-880, -840)
    p["noise"] = rng.uniform(15, 28)
    p["heart_centre"] = (rng.uniform(0.22, 0.34), rng.uniform(-0.2, -0.08), rng.uniform(0.04, 0.14))
    p["heart_axes"] = (rng.uniform(0.18, 0.24), rng.uniform(0.17, 0.22), rng.uniform(0.2, 0.26))
    p["shell"] = rng.uniform(1.1, 1.16)
    p["vb_centre"] = (0.0, rng.uniform(0.36, 0.42))
    p["vb_axes"] = (rng.uniform(0.13, 0.16), rng.uniform(0.11, 0.13))
    p["rim_mm"] = rng.uniform(1.5, 2.5)
    p["vert_period"] = rng.uniform(1 / 9, 1 / 7)
    p["vert_phase"] = rng.uniform(0, 1)
    p["vert_body_share"] = rng.uniform(0.78, 0.85)
    p["plate_share"] = 0.06
    p["cortex_hu"] = rng.uniform(600, 800)
    p["bone_hu"] = float(rng.uniform(50, 100) if rng.random() < 0.4 else rng.uniform(100, 300))
    p["aorta"] = (rng.uniform(0.12, 0.18), rng.uniform(0.22, 0.28))
    p["lung_centres"] = ((-rng.uniform(0.38, 0.44), rng.uniform(-0.08, -0.02)),
                         (rng.uniform(0.38, 0.44), rng.uniform(-0.08, -0.02)))
    p["lung_axes"] = ((rng.uniform(0.3, 0.34), rng.uniform(0.42, 0.48)),
                      (rng.uniform(0.28, 0.32), rng.uniform(0.42, 0.48)))
    p["lung_z"] = ((rng.uniform(0.03, 0.1), rng.uniform(0.9, 0.97)), (rng.uniform(0.03, 0.1), rng.uniform(0.9, 0.97)))
    phantom = ChestPhantom(seed, shape, spacing_mm, findings, p)

    # Reference lattice (relative coordinates) for thresholds and placements: the same for
    # any rendering of this phantom.
    rw = (np.arange(32) + 0.5) / 32
    rv = (np.arange(48) + 0.5) / 48 * 2 - 1
    ref = phantom.anatomy(rw, rv, rv)["lung"]
    ref_points = np.argwhere(ref)

    def lung_point() -> np.ndarray:
        k = ref_points[rng.integers(len(ref_points))]
        jitter = rng.uniform(-0.5, 0.5, 3)
        return phantom.rel_to_mm((k[0] + 0.5 + jitter[0]) / 32, (k[1] + 0.5 + jitter[1]) / 48 * 2 - 1,
                                 (k[2] + 0.5 + jitter[2]) / 48 * 2 - 1)

    # vessel trees from each hilum
    vessels = []
    for (cu, cv), (w0, w1) in zip(p["lung_centres"], p["lung_z"]):
        hilum = phantom.rel_to_mm(0.55 * (w0 + w1), cv + 0.05, cu * 0.45)
        for _ in range(int(rng.integers(8, 14))):
            tip = lung_point()
            if np.sign(tip[2] - phantom.extent_mm[2] / 2) != np.sign(cu):
                continue
            bend = hilum + (tip - hilum) * 0.5 + rng.normal(0, 4, 3)
            radius = rng.uniform(0.9, 1.8)
            vessels.append((hilum, bend, radius * 1.3))
            vessels.append((bend, tip, radius))
    p["vessels"] = vessels

    field_rng = np.random.default_rng([*np.atleast_1d(seed), 11])
    p["emph_field"] = field_rng.normal(0, 1, (6, 8, 8)).astype(np.float32)
    p["covid_field"] = field_rng.normal(0, 1, (5, 6, 6)).astype(np.float32)
    p["covid_density"] = field_rng.normal(0, 1.5, (6, 8, 8)).astype(np.float32)
    p["emph_bias"] = 0.8
    if findings["emphysema"]:
        share = rng.uniform(0.02, 0.45)
        p["emph_hu"] = rng.uniform(-980, -960)
        values = _field(p["emph_field"], rw, rv, rv)[ref] + p["emph_bias"] * rw[np.nonzero(ref)[0]]
        p["emph_threshold"] = float(np.quantile(values, 1 - share))
        p["emph_share"] = share
    if findings["covid"]:
        share = rng.uniform(0.01, 0.9)
        values = (_field(p["covid_field"], rw, rv, rv) + phantom._covid_bias(rw, rv, rv))[ref]
        p["covid_threshold"] = float(np.quantile(values, 1 - share))
        p["covid_share"] = share
    if findings["nodule"]:
        # Sizes 5-30 mm, capped by the lung (half its width, 40 % of its height).
        lung_width = 2 * min(a[0] for a in p["lung_axes"]) * phantom.extent_mm[2] / 2
        lung_height = min(w1 - w0 for w0, w1 in p["lung_z"]) * phantom.extent_mm[0]
        cap = max(5.0, min(30.0, 0.5 * lung_width, 0.4 * lung_height))
        diameter = float(np.exp(rng.uniform(np.log(5.0), np.log(cap))))
        r = diameter / 2
        # centre: a lung point whose sphere (6 extreme points) lies in the lung
        for _ in range(200):
            centre = lung_point()
            probes = [centre + s * r * e for s in (-1, 1) for e in np.eye(3)]
            rel = [(q[0] / phantom.extent_mm[0], q[1] / phantom.extent_mm[1] * 2 - 1,
                    q[2] / phantom.extent_mm[2] * 2 - 1) for q in probes]
            if all(phantom.anatomy(np.array([a]), np.array([b]), np.array([c]))["lung"][0, 0, 0] for a, b, c in rel):
                break
        p["nodule_centre"] = centre
        p["nodule_mm"] = diameter
        p["nodule_hu"] = rng.uniform(0, 60)
    if findings["cac"]:
        burden = rng.choice(3, p=(0.4, 0.35, 0.25))
        count = int(rng.integers(*((1, 4), (2, 6), (5, 13))[burden]))
        size = ((2.0, 4.5), (3.5, 7.0), (5.0, 9.0))[burden]
        hc, ha = p["heart_centre"], p["heart_axes"]
        centre_mm = phantom.rel_to_mm(*hc)
        axes_mm = np.array(ha) * np.array([phantom.extent_mm[0], phantom.extent_mm[1] / 2, phantom.extent_mm[2] / 2])
        plaques = []
        # coronary paths on the heart surface: (azimuth, elevation) as functions of s in [0, 1]
        paths = (lambda s: (np.pi * (0.9 + 0.6 * s), 0.15 - 0.2 * s),  # right coronary (AV groove)
                 lambda s: (np.pi * 1.55 + 0.1 * np.sin(3 * s), 0.5 - 1.2 * s),  # LAD (anterior)
                 lambda s: (np.pi * (1.7 + 0.5 * s), 0.2 + 0.1 * s))  # circumflex
        for _ in range(count):
            azimuth, elevation = paths[int(rng.integers(3))](rng.uniform())
            direction = np.array([np.sin(elevation), np.cos(elevation) * np.sin(azimuth),
                                  np.cos(elevation) * np.cos(azimuth)])
            centre = centre_mm + 1.04 * axes_mm * direction
            d = rng.uniform(*size)
            radii = (d / 2 * rng.uniform(0.7, 1.2), d / 2 * rng.uniform(0.6, 1.0), d / 2 * rng.uniform(0.6, 1.0))
            plaques.append((centre, radii, float(rng.uniform(150, 1000))))
        p["plaques"] = plaques
    return phantom
