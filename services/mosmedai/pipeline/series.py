"""CT series assembly: order a series' slices into one regular volume (refused with a named
reason when it is not one), and sample it onto a volume family's network grid
(``mosmedai.catalog.volumes``)."""

from __future__ import annotations

import numpy as np

from mosmedai.catalog.volumes import VolumeGeometry, sample_indices
from mosmedai.pipeline.errors import InputError

#: Orientation cosines of two slices agree within this (about 0.06 degrees).
ORIENTATION_TOLERANCE = 1e-3
#: Gaps between neighbouring slices may differ from the series' typical gap by this share
#: (scanners write positions rounded to 0.01 mm; 10 % also absorbs table-speed jitter).
SPACING_TOLERANCE = 0.1
#: Fewest slices a volume tool reads.
MIN_SLICES = 8


def _volume_error(code: str, series_uid: str, message: str, **details):
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
