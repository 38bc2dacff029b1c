"""Synthetic non-contrast head CT with known findings, for the head CT tools.

This module owns the phantoms: the anatomy drawn from a seed (`make_anatomy`, `Anatomy`) and
its rendering in Hounsfield units (`render`); the network's grid input and targets, training,
evaluation, the model cards and the cases are in ``mosmedai_training.ct_brain``.

Phantoms (`render`): an axial head CT series in Hounsfield units, slice 0 at the feet, drawn
analytically in millimetres - scalp, skull (ellipsoid shell ~+1000 HU), a thin subarachnoid
CSF rim, cortex (grey ~40 HU) with sulci over white matter (~30 HU), deep grey nuclei, the
interhemispheric fissure with the falx, two lateral ventricles (~+5 HU) either side of the
septum and a third ventricle; findings at known places: haemorrhage (60-80 HU: an
intraparenchymal haematoma, a convexity subdural crescent or a falcine subdural strip), early
ischaemia (−5..−10 HU and loss of grey-white differentiation in part of an MCA, ACA or PCA
territory) and mass effect (ventricles, septum and third ventricle pushed sideways by a known
number of mm, the ventricle on the side of the mass compressed). A mild in-plane blur (partial
volume) and white noise (~5 HU) are applied. Deterministic from the seed sequence
(split seed, index); splits from `mosmedai.phantoms`.

Patient orientation: Image Orientation (Patient) [1,0,0,0,1,0] (LPS), so columns increase
towards the patient's LEFT (image right = patient left, radiological display) and rows
towards posterior. A signed shift > 0 moves the septum towards the patient's left.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: In-plane size of the series the cases (and held-out evaluation) use.
CASE_SIZE = 256
#: Partial-volume blur (Gaussian sigma, mm) applied in-plane before the noise.
BLUR_MM = 0.6

#: Probabilities of the phantom mix.
P_MASS = 0.4  # mass effect (midline shift 1-14 mm)
P_MASS_HAEMORRHAGE = 0.8  # the mass is a haematoma (else a hypodense tumour with oedema)
P_HAEMORRHAGE_NO_MASS = (0.5 - P_MASS * P_MASS_HAEMORRHAGE) / (1 - P_MASS)  # overall 50 %
P_ISCHAEMIA = 0.5

Seed = int | tuple[int, ...]


# --------------------------------------------------------------------------------------
# anatomy


@dataclass
class Anatomy:
    """Everything needed to draw one head, in mm. x: towards patient left, y: towards
    posterior, z: towards the head; (0, 0) in-plane is the centre of the field of view."""

    n_slices: int
    dz: float  # slice spacing, mm
    fov: float  # in-plane field of view, mm (square)
    z_first: float  # z of slice 0
    xc: float
    yc: float
    z0: float  # centre of the skull ellipsoid
    axes: tuple[float, float, float]  # outer skull semi-axes (x, y, z)
    skull_t: float
    skull_hu: float
    scalp_t: float
    grey: float
    white: float
    csf: float
    noise: float
    gyri: tuple[float, float, float, float]  # frequencies / phases of the sulcal pattern
    shift: float  # signed septum displacement, mm (+ = towards patient left)
    vent: dict  # ventricle geometry
    haemorrhage: dict | None = None
    ischaemia: dict | None = None
    tumour: dict | None = None

    @property
    def midline(self) -> float:
        return self.xc

    @property
    def inner(self) -> tuple[float, float, float]:
        return tuple(a - self.skull_t for a in self.axes)  # type: ignore[return-value]

    def slice_z(self, index: np.ndarray | int) -> np.ndarray:
        return self.z_first + np.asarray(index, np.float64) * self.dz


def _rng(seed: Seed) -> np.random.Generator:
    return np.random.default_rng(list(seed) if isinstance(seed, (tuple, list)) else seed)


def make_anatomy(seed: Seed) -> Anatomy:
    rng = _rng(seed)
    ax, ay, az = rng.uniform(66, 74), rng.uniform(84, 94), rng.uniform(70, 80)
    fov = rng.uniform(200.0, 235.0)
    dz = float(rng.uniform(2.5, 5.0))
    coverage = rng.uniform(115.0, 140.0)
    n = int(np.clip(round(coverage / dz), 20, 60))
    xc, yc = rng.uniform(-8, 8), rng.uniform(-8, 8)
    z0 = 0.0
    z_top = z0 + az + rng.uniform(0, 8)
    z_first = z_top - (n - 1) * dz
    mass = rng.random() < P_MASS
    shift = float(rng.uniform(1.0, 14.0) * rng.choice([-1.0, 1.0])) if mass else 0.0
    vent = {
        "gap": rng.uniform(2.6, 3.6), "rx": rng.uniform(6.0, 10.0), "ry": rng.uniform(24, 32),
        "rz": rng.uniform(10, 14), "y": yc - rng.uniform(2, 8), "z": z0 + rng.uniform(8, 16),
        "compress": rng.uniform(0.45, 0.8),
    }
    anatomy = Anatomy(
        n_slices=n, dz=dz, fov=fov, z_first=z_first, xc=xc, yc=yc, z0=z0, axes=(ax, ay, az),
        skull_t=rng.uniform(5, 8), skull_hu=rng.uniform(750, 1300), scalp_t=rng.uniform(3, 6),
        grey=rng.uniform(37, 43), white=rng.uniform(27, 32), csf=rng.uniform(2, 8), noise=rng.uniform(4, 6),
        gyri=(rng.uniform(9, 13), rng.uniform(6, 9), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)),
        shift=shift, vent=vent,
    )
    bx, by, bz = anatomy.inner
    if mass:
        mass_side = -np.sign(shift)  # the mass pushes the septum away from its side
        if rng.random() < P_MASS_HAEMORRHAGE:
            if rng.random() < 0.5:
                anatomy.haemorrhage = _subdural(rng, anatomy, mass_side, thickness=abs(shift) * 0.8 + rng.uniform(4, 8))
            else:
                anatomy.haemorrhage = _intraparenchymal(rng, anatomy, mass_side,
                                                        diameter=20 + abs(shift) * 1.8 + rng.uniform(0, 8))
        else:
            anatomy.tumour = _tumour(rng, anatomy, mass_side, diameter=20 + abs(shift) * 1.5)
    elif rng.random() < P_HAEMORRHAGE_NO_MASS:
        side = rng.choice([-1.0, 1.0])
        kind = rng.choice(["iph", "sdh", "falx"], p=[0.45, 0.4, 0.15])
        if kind == "iph":
            anatomy.haemorrhage = _intraparenchymal(rng, anatomy, side, diameter=rng.uniform(9, 30))
        elif kind == "sdh":
            anatomy.haemorrhage = _subdural(rng, anatomy, side, thickness=rng.uniform(3.5, 8))
        else:
            anatomy.haemorrhage = _falcine(rng, anatomy)
    if rng.random() < P_ISCHAEMIA:
        anatomy.ischaemia = _ischaemia(rng, anatomy)
    return anatomy


def _intraparenchymal(rng, a: Anatomy, side: float, diameter: float) -> dict:
    bx, by, bz = a.inner
    r = diameter / 2
    offset = rng.uniform(14 + r * 0.5, max(15 + r * 0.5, bx - r - 8))
    return {
        "kind": "iph", "side": "left" if side > 0 else "right",
        "centre": (a.midline + side * offset, a.yc + rng.uniform(-0.45, 0.45) * by,
                   a.z0 + rng.uniform(-5, 0.45 * bz)),
        "radii": tuple(r * rng.uniform(0.8, 1.2, 3)), "hu": rng.uniform(60, 80), "oedema": rng.uniform(2, 5),
    }


def _subdural(rng, a: Anatomy, side: float, thickness: float) -> dict:
    return {
        "kind": "sdh", "side": "left" if side > 0 else "right", "sign": float(side),
        "thickness": float(min(thickness, 18.0)), "theta": rng.uniform(-0.5, 0.5),  # centre direction (axial)
        "spread": rng.uniform(0.7, 1.2), "z": a.z0 + rng.uniform(0, 30), "zspread": rng.uniform(25, 45),
        "hu": rng.uniform(60, 80),
    }


def _falcine(rng, a: Anatomy) -> dict:
    return {
        "kind": "falx", "side": "midline", "width": rng.uniform(3.0, 5.5),
        "y": (a.yc + rng.uniform(-60, -10), ), "length": rng.uniform(30, 60),
        "z": (a.z0 + rng.uniform(25, 35)), "height": rng.uniform(20, 35), "hu": rng.uniform(60, 80),
    }


def _tumour(rng, a: Anatomy, side: float, diameter: float) -> dict:
    bx, by, bz = a.inner
    r = diameter / 2
    return {
        "centre": (a.midline + side * rng.uniform(18 + r * 0.4, max(19 + r * 0.4, bx - r - 6)),
                   a.yc + rng.uniform(-0.3, 0.3) * by, a.z0 + rng.uniform(0, 0.35 * bz)),
        "radius": r, "hu": rng.uniform(14, 22),
    }


def _ischaemia(rng, a: Anatomy) -> dict:
    territory = rng.choice(["MCA", "ACA", "PCA"], p=[0.6, 0.2, 0.2])
    side = float(rng.choice([-1.0, 1.0]))
    return {
        "territory": str(territory), "side": "left" if side > 0 else "right", "sign": side,
        "drop": rng.uniform(5, 10), "part": rng.uniform(0.5, 1.0), "phase": rng.uniform(0, 1),
    }


# --------------------------------------------------------------------------------------
# rendering


def _smooth_step(x: np.ndarray, width: float) -> np.ndarray:
    return np.clip(0.5 + x / (2 * width), 0.0, 1.0)


def render(anatomy: Anatomy, size: int, slices: np.ndarray | None = None, seed: Seed = 0,
           noise: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """HU (float32 [k, size, size]) of the requested source slices (default all) at an in-plane
    matrix of ``size`` pixels over the field of view, and the finding masks (bool, same shape):
    ``haemorrhage``, ``ischaemia``, ``septum`` (septum pellucidum sheet), ``midline`` (falx plane)."""
    a = anatomy
    slices = np.arange(a.n_slices) if slices is None else np.asarray(slices)
    px = a.fov / size
    coords = (np.arange(size) + 0.5) * px - a.fov / 2
    y, x = np.meshgrid(coords.astype(np.float32), coords.astype(np.float32), indexing="ij")
    rng = _rng((*(seed if isinstance(seed, tuple) else (seed,)), 77))
    ax, ay, az = a.axes
    bx, by, bz = a.inner
    out = np.empty((len(slices), size, size), np.float32)
    masks = {k: np.zeros((len(slices), size, size), bool) for k in ("haemorrhage", "ischaemia", "septum", "midline")}
    dxm = x - a.midline
    dyc = y - a.yc
    theta = np.arctan2(dyc, dxm)
    v = a.vent
    gf1, gf2, gp1, gp2 = a.gyri
    for k, z in enumerate(a.slice_z(slices)):
        zr = (z - a.z0)
        hu = np.full((size, size), -1000.0, np.float32)
        rho_scalp = np.sqrt((dxm / (ax + a.scalp_t)) ** 2 + (dyc / (ay + a.scalp_t)) ** 2 + (zr / (az + a.scalp_t)) ** 2)
        rho_out = np.sqrt((dxm / ax) ** 2 + (dyc / ay) ** 2 + (zr / az) ** 2)
        rho_in = np.sqrt((dxm / bx) ** 2 + (dyc / by) ** 2 + (zr / bz) ** 2)
        hu[rho_scalp < 1] = 35.0
        hu[rho_out < 1] = a.skull_hu
        brain = rho_in < 1
        if brain.any():
            depth = (1 - rho_in) * (bx * by * bz) ** (1 / 3)  # approximate mm below the inner table
            phi = np.arctan2(zr, np.hypot(dxm, dyc) + 1e-3)
            pattern = np.sin(gf1 * theta + gp1) * np.sin(gf2 * phi + gp2 + 0.7 * np.cos(3 * theta))
            grey_depth = 1.5 + 3.0 + 1.5 * pattern
            tissue = np.where(depth < grey_depth, a.grey, a.white).astype(np.float32)
            sulcus = (depth < grey_depth + 1.0) & (np.abs(pattern) < 0.10) & (depth > 1.0)
            tissue[sulcus] = a.csf
            tissue[depth < 1.5] = a.csf
            # deep grey nuclei, pushed with half the shift
            for s in (-1.0, 1.0):
                cx = a.midline + a.shift * 0.6 + s * (v["gap"] / 2 + v["rx"] + 8)
                r = ((x - cx) / 9) ** 2 + ((y - (v["y"] + 12)) / 14) ** 2 + ((z - (v["z"] - 12)) / 10) ** 2
                tissue[r < 1] = a.grey
            # interhemispheric fissure and falx (fixed at the midline), above and beside the ventricles
            fissure = (np.abs(dxm) < 1.6) & ((z > v["z"] + v["rz"] + 2) | (np.abs(y - v["y"]) > v["ry"] + 8)) & (depth > 0)
            tissue[fissure] = a.csf
            tissue[fissure & (np.abs(dxm) < 0.5)] = 55.0
            masks["midline"][k] = (np.abs(dxm) < 0.5 * px + 0.5) & brain & (depth > 3)
            # ventricles: bodies either side of the septum, the third ventricle below
            sept = a.midline + a.shift
            for s in (-1.0, 1.0):
                rx = v["rx"] * (v["compress"] if (a.shift != 0 and s == -np.sign(a.shift)) else 1.0)
                cx = sept + s * (v["gap"] / 2 + rx)
                r = ((x - cx) / rx) ** 2 + ((y - v["y"]) / v["ry"]) ** 2 + ((z - v["z"]) / v["rz"]) ** 2
                tissue[r < 1] = a.csf
            r3 = ((x - sept) / 2.0) ** 2 + ((y - v["y"] - 8) / 14) ** 2 + ((z - (v["z"] - v["rz"] - 4)) / 9) ** 2
            tissue[r3 < 1] = a.csf
            septum_r = ((y - v["y"]) / (0.8 * v["ry"])) ** 2 + ((z - v["z"]) / (0.8 * v["rz"])) ** 2
            masks["septum"][k] = (np.abs(x - sept) < 0.5 * px + 0.5) & (septum_r < 1) & brain
            if a.tumour is not None:
                t = a.tumour
                cx, cy, cz = t["centre"]
                r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
                oedema = (r < t["radius"] * 1.6) & (depth > 5)
                tissue[oedema] = np.minimum(tissue[oedema], a.white - 9)
                tissue[r < t["radius"]] = t["hu"]
            if a.ischaemia is not None:
                member = _ischaemia_membership(a, x, y, z, depth)
                if member.any():
                    grey_lost = np.where(tissue == a.grey, a.white, tissue)
                    affected = np.where(tissue == a.csf, tissue, grey_lost - a.ischaemia["drop"])
                    tissue = tissue + member * (affected - tissue)
                    masks["ischaemia"][k] = (member > 0.5) & (tissue != a.csf)
            if a.haemorrhage is not None:
                blood = _haemorrhage_mask(a, x, y, z, depth, dxm, dyc, zr, tissue)
                tissue[blood] = a.haemorrhage["hu"]
                masks["haemorrhage"][k] = blood & brain
            hu[brain] = tissue[brain]
        sigma = BLUR_MM / px
        if sigma > 0.3:
            hu = cv2.GaussianBlur(hu, (0, 0), sigma)
        out[k] = hu
    if noise:
        out += rng.normal(0.0, a.noise, out.shape).astype(np.float32)
    return out, masks


def _ischaemia_membership(a: Anatomy, x, y, z, depth) -> np.ndarray:
    i = a.ischaemia
    s = i["sign"]
    lat = s * (x - a.midline)  # mm towards the affected side
    bx, by, bz = a.inner
    part, phase = i["part"], i["phase"]
    if i["territory"] == "MCA":
        # lateral wedge: from 18 mm off the midline to the cortex, the middle of the AP extent
        y_lo = a.yc - 40 + phase * (1 - part) * 60
        y_hi = y_lo + 60 * part + 10
        z_lo, z_hi = a.z0 - 12, a.z0 + 30 + 10 * part
        inside = np.minimum.reduce([
            _smooth_step(lat - 20, 4), _smooth_step(y - y_lo, 5), _smooth_step(y_hi - y, 5),
        ]) * float(np.clip(min(z - z_lo, z_hi - z) / 5 + 0.5, 0, 1))
    elif i["territory"] == "ACA":
        y_lo, y_hi = a.yc - by, a.yc - 5 - 20 * (1 - part)
        inside = np.minimum.reduce([
            _smooth_step(lat - 2.5, 1.5), _smooth_step(25 - lat, 4), _smooth_step(y - y_lo, 5), _smooth_step(y_hi - y, 5),
        ]) * float(np.clip((z - (a.z0 + 5)) / 5 + 0.5, 0, 1))
    else:  # PCA
        y_lo = a.yc + 35 + 15 * (1 - part)
        inside = np.minimum.reduce([
            _smooth_step(lat - 2.5, 1.5), _smooth_step(40 - lat, 4), _smooth_step(y - y_lo, 5),
        ]) * float(np.clip(min(z - (a.z0 - 20), (a.z0 + 20) - z) / 5 + 0.5, 0, 1))
    return (inside * (depth > 0)).astype(np.float32)


def _haemorrhage_mask(a: Anatomy, x, y, z, depth, dxm, dyc, zr, tissue) -> np.ndarray:
    h = a.haemorrhage
    if h["kind"] == "iph":
        cx, cy, cz = h["centre"]
        rx, ry, rz = h["radii"]
        r = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2
        rim = (r < (1 + h["oedema"] / min(rx, ry, rz)) ** 2) & (tissue != a.csf) & (depth > 1.5)
        tissue[rim] = a.white - 6
        return r < 1
    if h["kind"] == "sdh":
        # crescent along the inner table, thickest at `theta` (axial angle from the lateral direction)
        lateral = np.arctan2(dyc, h["sign"] * dxm)  # 0 = straight lateral on the bleeding side
        angle = np.abs(lateral - h["theta"]) / h["spread"]
        vertical = np.abs(z - h["z"]) / h["zspread"]
        profile = np.cos(np.clip(np.hypot(angle, vertical), 0, 1) * np.pi / 2)
        return (depth < h["thickness"] * profile) & (depth >= 0) & (h["sign"] * dxm > 0)
    # falcine strip either side of the falx
    y0 = h["y"][0]
    return ((np.abs(dxm) < h["width"] / 2) & (y > y0) & (y < y0 + h["length"])
            & (np.abs(z - h["z"]) < h["height"] / 2) & (depth > 2))
