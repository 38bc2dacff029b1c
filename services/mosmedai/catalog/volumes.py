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
