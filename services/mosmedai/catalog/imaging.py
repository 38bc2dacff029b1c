"""Radiograph preprocessing shared by the Triton preprocess models, training and benchmarks.

One implementation serves all three so the networks see at serving time exactly what they
were trained on. The pipeline follows the DICOM grayscale chain (PS3.3 C.11, PS3.4 N.2):

    stored value -> Modality LUT (Rescale Slope/Intercept) -> VOI LUT or window
    -> Presentation (MONOCHROME1 inverted) -> letterboxed to the network's square input.

Stored values travel as UINT16. Signed data (Pixel Representation 1) is shifted by 32768
in the gateway and the shift folded into the intercept, so one tensor type covers both.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import cv2
import numpy as np

#: Shift applied to signed stored values so they fit UINT16 (Pixel Representation 1).
SIGNED_SHIFT = 32768

#: Side of the square network input, pixels.
NETWORK_SIZE = 256


class VoiFunction(IntEnum):
    """VOI LUT Function (0028,1056) values, plus the cases without a window."""

    AUTO = 0  # no window and no VOI LUT in the header: robust percentile window
    LINEAR = 1
    LINEAR_EXACT = 2
    SIGMOID = 3
    TABLE = 4  # VOI LUT Sequence (0028,3010)


# Order of the values in the `params` tensor of a preprocess model.
PARAM_NAMES = (
    "rescale_slope",
    "rescale_intercept",  # already includes -slope*SIGNED_SHIFT for signed data
    "window_center",
    "window_width",
    "voi_function",
    "invert",  # 1 for MONOCHROME1
    "lut_first_mapped",
    "lut_length",
)
N_PARAMS = len(PARAM_NAMES)


@dataclass(frozen=True)
class GrayscaleParams:
    """The header values the grayscale chain needs, in DICOM units."""

    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    window_center: float = 0.0
    window_width: float = 0.0
    voi_function: VoiFunction = VoiFunction.AUTO
    invert: bool = False
    lut_first_mapped: float = 0.0
    lut: np.ndarray | None = None

    def as_vector(self) -> np.ndarray:
        lut_length = 0 if self.lut is None else len(self.lut)
        return np.array(
            [
                self.rescale_slope,
                self.rescale_intercept,
                self.window_center,
                self.window_width,
                float(self.voi_function),
                1.0 if self.invert else 0.0,
                self.lut_first_mapped,
                lut_length,
            ],
            dtype=np.float32,
        )

    @classmethod
    def from_vector(cls, vector: np.ndarray, lut: np.ndarray | None = None) -> "GrayscaleParams":
        values = dict(zip(PARAM_NAMES, (float(v) for v in vector)))
        lut_length = int(values.pop("lut_length"))
        return cls(
            rescale_slope=values["rescale_slope"],
            rescale_intercept=values["rescale_intercept"],
            window_center=values["window_center"],
            window_width=values["window_width"],
            voi_function=VoiFunction(int(values["voi_function"])),
            invert=values["invert"] >= 0.5,
            lut_first_mapped=values["lut_first_mapped"],
            lut=None if lut is None or lut_length == 0 else np.asarray(lut[:lut_length], np.float32),
        )


def to_display(stored: np.ndarray, params: GrayscaleParams) -> np.ndarray:
    """Stored values -> display values in [0, 1], 1 = bright (bone white, air dark)."""
    values = stored.astype(np.float32)
    if params.rescale_slope != 1.0 or params.rescale_intercept != 0.0:
        values = values * np.float32(params.rescale_slope) + np.float32(params.rescale_intercept)

    function = params.voi_function
    if function == VoiFunction.TABLE and params.lut is not None and len(params.lut) > 0:
        lut = params.lut
        index = np.clip(values - params.lut_first_mapped, 0, len(lut) - 1).astype(np.int32)
        low, high = float(lut.min()), float(lut.max())
        shown = (lut[index] - low) / max(high - low, 1e-6)
    elif function in (VoiFunction.LINEAR, VoiFunction.LINEAR_EXACT, VoiFunction.SIGMOID) and (
        params.window_width > 0
    ):
        center, width = params.window_center, params.window_width
        if function == VoiFunction.SIGMOID:  # PS3.3 C.11.2.1.3.1
            shown = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        elif function == VoiFunction.LINEAR_EXACT:  # PS3.3 C.11.2.1.3.2
            shown = np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0)
        else:  # LINEAR, PS3.3 C.11.2.1.2.1: center - 0.5 and width - 1 by definition
            width1 = max(width - 1.0, 1.0)
            shown = np.clip((values - (center - 0.5)) / width1 + 0.5, 0.0, 1.0)
    else:
        # No window in the header: a percentile window is robust to burnt-in labels
        # and collimator edges that a plain min/max would stretch to.
        sample = values[::4, ::4] if values.ndim == 2 and values.size > 65536 else values
        low, high = np.percentile(sample, (0.5, 99.5))
        shown = np.clip((values - low) / max(float(high - low), 1e-6), 0.0, 1.0)

    shown = shown.astype(np.float32, copy=False)
    if params.invert:
        shown = 1.0 - shown
    return shown


@dataclass(frozen=True)
class Letterbox:
    """How an image of (height, width) was placed into the square network input."""

    scale: float  # network pixels per source pixel
    pad_top: float
    pad_left: float
    height: float
    width: float

    def as_vector(self) -> np.ndarray:
        return np.array([self.scale, self.pad_top, self.pad_left, self.height, self.width], np.float32)

    @classmethod
    def from_vector(cls, vector: np.ndarray) -> "Letterbox":
        return cls(*(float(v) for v in vector[:5]))

    def to_source(self, row: float, col: float) -> tuple[float, float]:
        """Network-input coordinates -> source pixel coordinates (row, column)."""
        return (row - self.pad_top) / self.scale, (col - self.pad_left) / self.scale


def fit_geometry(height: int, width: int, size: int = NETWORK_SIZE) -> tuple[Letterbox, int, int]:
    """Aspect-preserving fit of (height, width) into size x size: geometry and the fitted shape."""
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return Letterbox(scale, (size - new_h) // 2, (size - new_w) // 2, height, width), new_h, new_w


def preprocess(
    stored: np.ndarray, params: GrayscaleParams, size: int = NETWORK_SIZE
) -> tuple[np.ndarray, Letterbox]:
    """Stored values of one frame -> the network input (size x size, [0, 1]) and its geometry.

    Any size and aspect: the image is fitted keeping its aspect and padded with 0 (black).
    """
    if stored.ndim != 2 or min(stored.shape) < 1:
        raise ValueError(f"expected one 2-D frame, got shape {stored.shape}")
    geometry, new_h, new_w = fit_geometry(*stored.shape, size=size)
    # Resize first, then the grayscale chain on the small image: 100x fewer pixels, and
    # the chain is per pixel, so for linear windows it commutes with averaging. Training
    # uses this same function, so serving sees what the network learnt. INTER_AREA
    # averages every source pixel under a target pixel: no aliasing from 2500 down to 256.
    source = stored if stored.dtype in (np.uint8, np.uint16, np.float32) else stored.astype(np.float32)
    small = cv2.resize(source, (new_w, new_h), interpolation=cv2.INTER_AREA)
    out = np.zeros((size, size), np.float32)
    top, left = int(geometry.pad_top), int(geometry.pad_left)
    out[top : top + new_h, left : left + new_w] = to_display(small, params)
    return out, geometry


#: Longest side of an image as it travels from the gateway to Triton, pixels: twice the
#: network input, so the preprocess model's own fit to NETWORK_SIZE still averages over
#: 2 x 2 transport pixels. A 2500 x 2048 radiograph travels as 512 x 419 (0.4 MB instead
#: of 10 MB); see README "How images travel".
TRANSPORT_MAX_SIDE = 2 * NETWORK_SIZE


def reduce_for_transport(stored: np.ndarray, max_side: int = TRANSPORT_MAX_SIDE) -> tuple[np.ndarray, float, float]:
    """Average k x k blocks of stored values, k the smallest whole factor that brings the
    long side to ``max_side`` or below (never enlarges).

    Returns the reduced frame and the (row, column) factors that map its pixel coordinates
    back to the source image. A whole factor is exact (every transport pixel is the mean of
    k x k source pixels, 4x faster than a fractional area resize); the last ``rows % k`` rows
    and ``columns % k`` columns (fewer than k, at the far edges) are left out. Averaging is
    what the preprocess fit does anyway, so the network input differs from a direct fit only
    by rounding to whole stored values.
    """
    height, width = stored.shape
    factor = -(-max(height, width) // max_side)  # ceil
    if factor <= 1:
        return stored, 1.0, 1.0
    rows, cols = height // factor, width // factor
    cropped = stored[: rows * factor, : cols * factor]
    reduced = cv2.resize(cropped, (cols, rows), interpolation=cv2.INTER_AREA)
    return reduced, float(factor), float(factor)
