"""CT series: ordering slices into a volume, and the network grid volumes travel on.

How a volume travels (README "How volumes travel"): the gateway assembles a series into a
volume of Hounsfield units (Rescale Slope/Intercept applied), samples it onto the family's
network grid (e.g. 48 x 96 x 96) and sends that grid as INT16 with a ``geometry`` vector.
A 128-slice 512 x 512 chest CT (64 MB of pixels) travels as 0.9 MB, far below gRPC's
message limits, whatever the series length. Sampling is nearest-neighbour at the grid
cell centres, so HU statistics (emphysema's share below -950 HU, a vertebra's mean HU) are
unbiased estimates of the source's; millimetres come back through ``geometry``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Fields of the geometry vector, in order.
GEOMETRY_FIELDS = (
    "source_slices", "source_rows", "source_cols",
    "slice_spacing_mm", "row_spacing_mm", "col_spacing_mm",
    "grid_slices", "grid_rows", "grid_cols",
)
N_GEOMETRY = len(GEOMETRY_FIELDS)


@dataclass(frozen=True)
class VolumeGeometry:
    """How a source volume (slices, rows, columns) with its spacing maps onto the grid."""

    source_slices: int
    source_rows: int
    source_cols: int
    slice_spacing_mm: float  # between slice centres along the slice normal
    row_spacing_mm: float  # Pixel Spacing[0]: between rows
    col_spacing_mm: float  # Pixel Spacing[1]: between columns
    grid_slices: int
    grid_rows: int
    grid_cols: int

    def as_vector(self) -> np.ndarray:
        return np.array([getattr(self, name) for name in GEOMETRY_FIELDS], np.float32)

    @classmethod
    def from_vector(cls, vector: np.ndarray) -> "VolumeGeometry":
        values = [float(v) for v in np.asarray(vector).reshape(-1)[:N_GEOMETRY]]
        return cls(*(int(round(v)) if name.startswith(("source_", "grid_")) else v
                     for name, v in zip(GEOMETRY_FIELDS, values)))

    @property
    def source_shape(self) -> tuple[int, int, int]:
        return self.source_slices, self.source_rows, self.source_cols

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return self.grid_slices, self.grid_rows, self.grid_cols

    @property
    def grid_spacing_mm(self) -> tuple[float, float, float]:
        """Size of one grid voxel (slice, row, column direction), millimetres."""
        return (
            self.source_slices * self.slice_spacing_mm / self.grid_slices,
            self.source_rows * self.row_spacing_mm / self.grid_rows,
            self.source_cols * self.col_spacing_mm / self.grid_cols,
        )

    @property
    def grid_voxel_ml(self) -> float:
        dz, dy, dx = self.grid_spacing_mm
        return dz * dy * dx / 1000.0

    def to_source(self, slice_: float, row: float, col: float) -> tuple[float, float, float]:
        """Continuous grid coordinates (voxel edges: voxel k spans [k, k+1)) -> source
        coordinates in the same convention (slice index edges, pixel edges)."""
        return (
            slice_ * self.source_slices / self.grid_slices,
            row * self.source_rows / self.grid_rows,
            col * self.source_cols / self.grid_cols,
        )

    def source_slice_of(self, grid_slice: float) -> int:
        """Index of the source slice (0 = first in the ordered series) holding a grid slice position."""
        index = int(np.floor((grid_slice + 0.5) * self.source_slices / self.grid_slices))
        return int(np.clip(index, 0, self.source_slices - 1))


def sample_indices(source: int, grid: int) -> np.ndarray:
    """Source index nearest to each grid cell centre."""
    return np.minimum(((np.arange(grid) + 0.5) * source / grid).astype(np.int64), source - 1)


def to_grid(hu: np.ndarray, spacing_mm: tuple[float, float, float],
            grid: tuple[int, int, int]) -> tuple[np.ndarray, VolumeGeometry]:
    """A volume in HU (slices, rows, columns) -> its INT16 grid sample and the geometry."""
    if hu.ndim != 3:
        raise ValueError(f"a volume is 3-D (slices, rows, columns), got shape {hu.shape}")
    slices, rows, cols = hu.shape
    picked = hu[np.ix_(sample_indices(slices, grid[0]), sample_indices(rows, grid[1]),
                       sample_indices(cols, grid[2]))]
    sampled = np.clip(np.rint(picked), -32768, 32767).astype(np.int16)
    geometry = VolumeGeometry(slices, rows, cols, *(float(s) for s in spacing_mm), *grid)
    return sampled, geometry


def window(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """HU -> [0, 1] through a window (the volume preprocess step; training uses it too)."""
    return np.clip((volume.astype(np.float32) - low) / (high - low), 0.0, 1.0)


# --- series assembly -----------------------------------------------------------------------
#: Orientation cosines of two slices agree within this (about 0.06 degrees).
ORIENTATION_TOLERANCE = 1e-3
#: Gaps between neighbouring slices may differ from the series' typical gap by this share
#: (scanners write positions rounded to 0.01 mm; 10 % also absorbs table-speed jitter).
SPACING_TOLERANCE = 0.1
#: Fewest slices a volume tool reads.
MIN_SLICES = 8


def _volume_error(code: str, series_uid: str, message: str, **details):
    from mosmedai.pipeline.dicom_input import InputError

    return InputError(422, code, f"series {series_uid}: {message}", series_instance_uid=series_uid, **details)


def order_slices(images: list) -> tuple[list, float]:
    """Sort a series' slices by Image Position (Patient) along the slice normal and check the
    series is one regular volume. Returns the ordered images and the slice spacing (mm).

    Raises InputError 422 naming the problem: missing geometry, mixed orientations, mixed
    sizes or pixel spacings, duplicate positions, a gap (missing slices) or uneven spacing.
    Instance Number is not trusted for order: it is only quoted in messages.
    """
    series_uid = images[0].series_instance_uid
    if len(images) < MIN_SLICES:
        raise _volume_error("too_few_slices", series_uid,
                            f"{len(images)} slices; the CT tools read a series of at least {MIN_SLICES}")
    missing = [image.sop_instance_uid for image in images if image.position_mm is None or image.orientation is None]
    if missing:
        raise _volume_error("missing_slice_geometry", series_uid,
                            f"{len(missing)} slices have no Image Position/Orientation (Patient)",
                            sop_instance_uids=missing[:10])
    reference = np.asarray(images[0].orientation)
    mixed = [image.sop_instance_uid for image in images
             if np.abs(np.asarray(image.orientation) - reference).max() > ORIENTATION_TOLERANCE]
    if mixed:
        raise _volume_error("mixed_orientations", series_uid,
                            f"{len(mixed)} slices differ in Image Orientation (Patient) from the first",
                            sop_instance_uids=mixed[:10])
    sizes = sorted({image.stored.shape for image in images})
    if len(sizes) > 1:
        raise _volume_error("mixed_sizes", series_uid, f"slices of different sizes (Rows x Columns): {sizes}")
    spacings = sorted({image.pixel_spacing_mm for image in images}, key=str)
    if len(spacings) > 1 or spacings[0] is None:
        raise _volume_error("mixed_pixel_spacing" if len(spacings) > 1 else "missing_pixel_spacing", series_uid,
                            f"Pixel Spacing must be present and equal on every slice; found {spacings}")
    normal = np.cross(reference[:3], reference[3:])
    along = np.array([float(np.dot(image.position_mm, normal)) for image in images])
    order = np.argsort(along, kind="stable")
    ordered = [images[i] for i in order]
    gaps = np.diff(along[order])
    duplicates = [ordered[i + 1].sop_instance_uid for i in np.nonzero(gaps < 1e-3)[0]]
    if duplicates:
        raise _volume_error("duplicate_slice_positions", series_uid,
                            f"{len(duplicates)} slices share a position with another slice",
                            sop_instance_uids=duplicates[:10])
    spacing = float(np.median(gaps))
    off = np.nonzero(np.abs(gaps - spacing) > SPACING_TOLERANCE * spacing)[0]
    if len(off):
        first = int(off[0])
        before, after = ordered[first], ordered[first + 1]
        where = (f"between the slices at {along[order][first]:.2f} mm and {along[order][first + 1]:.2f} mm "
                 f"along the normal (Instance Numbers {before.instance_number} and {after.instance_number})")
        ratio = gaps[first] / spacing
        if round(ratio) >= 2 and abs(ratio - round(ratio)) <= SPACING_TOLERANCE * round(ratio):
            missing_count = int(round(ratio)) - 1
            raise _volume_error("missing_slices", series_uid,
                                f"a gap of {gaps[first]:.2f} mm where slices are {spacing:.2f} mm apart: "
                                f"{missing_count} slice(s) missing {where}",
                                gaps_found=len(off))
        raise _volume_error("uneven_slice_spacing", series_uid,
                            f"slice gaps vary ({gaps.min():.2f} to {gaps.max():.2f} mm; typical {spacing:.2f}) "
                            f"first {where}")
    return ordered, spacing


def grid_from_images(ordered: list, spacing_mm: float,
                     grid: tuple[int, int, int]) -> tuple[np.ndarray, VolumeGeometry]:
    """Ordered slices -> the INT16 HU grid and geometry, reading only the sampled pixels
    (to_grid's nearest-neighbour sample, without building the full-resolution volume)."""
    rows, cols = ordered[0].stored.shape
    row_spacing, col_spacing = ordered[0].pixel_spacing_mm
    pick_rows, pick_cols = sample_indices(rows, grid[1]), sample_indices(cols, grid[2])
    out = np.empty(grid, np.int16)
    for k, index in enumerate(sample_indices(len(ordered), grid[0])):
        image = ordered[index]
        plane = image.stored[np.ix_(pick_rows, pick_cols)].astype(np.float32)
        plane = plane * image.params.rescale_slope + image.params.rescale_intercept
        out[k] = np.clip(np.rint(plane), -32768, 32767)
    geometry = VolumeGeometry(len(ordered), rows, cols, spacing_mm, row_spacing, col_spacing, *grid)
    return out, geometry
