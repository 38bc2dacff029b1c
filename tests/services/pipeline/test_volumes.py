"""CT series assembly: order along the slice normal, consistency checks, the network grid."""

import numpy as np
import pytest

from mosmedai.phantoms.dicom_build import build_dataset, ct_series, to_bytes
from mosmedai.pipeline.errors import InputError
from mosmedai.pipeline.dicom_input import decode
from mosmedai.pipeline.multipart import multipart_parts
from mosmedai.pipeline.work import plan
from mosmedai.catalog.volumes import VolumeGeometry, to_grid
from mosmedai.pipeline.series import grid_from_images, order_slices

SPACING = (2.5, 0.7, 0.7)


def volume(slices=20, size=64, seed=0):
    """HU with a ramp along the slices, so order mistakes show in the values."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(0, 5, (slices, size, size)) + (np.arange(slices) * 10.0 - 500)[:, None, None]
    return hu.astype(np.float32)


def decoded(datasets):
    return [decode(to_bytes(ds), 64 * 2**20) for ds in datasets]


def test_shuffled_slices_are_ordered_by_position_not_instance_number():
    hu = volume()
    datasets = ct_series(hu, SPACING)
    rng = np.random.default_rng(1)
    for ds, number in zip(datasets, rng.permutation(len(datasets))):
        ds.InstanceNumber = int(number) + 1  # Instance Numbers that lie about the order
    shuffled = [datasets[i] for i in rng.permutation(len(datasets))]
    ordered, spacing = order_slices(decoded(shuffled))
    assert spacing == pytest.approx(2.5)
    assert [im.sop_instance_uid for im in ordered] == [ds.SOPInstanceUID for ds in datasets]
    grid, geometry = grid_from_images(ordered, spacing, (20, 64, 64))
    np.testing.assert_allclose(grid, np.rint(hu), atol=1)  # HU back through Rescale Slope/Intercept


def test_reversed_slice_direction_orders_along_the_normal():
    hu = volume()
    datasets = ct_series(hu, SPACING)
    for index, ds in enumerate(datasets):  # positions run head to feet, listed the other way
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], -index * 2.5]
    ordered, spacing = order_slices(decoded(datasets))
    assert [im.sop_instance_uid for im in ordered] == [ds.SOPInstanceUID for ds in reversed(datasets)]
    assert spacing == pytest.approx(2.5)


def test_a_missing_slice_is_refused_naming_the_gap():
    datasets = ct_series(volume(), SPACING)
    del datasets[7]
    with pytest.raises(InputError) as refused:
        order_slices(decoded(datasets))
    assert refused.value.status == 422 and refused.value.code == "missing_slices"
    assert "1 slice(s) missing" in refused.value.message and "5.00 mm" in refused.value.message


def test_mixed_orientations_and_sizes_are_refused():
    datasets = ct_series(volume(), SPACING)
    datasets[3].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(InputError) as refused:
        order_slices(decoded(datasets))
    assert refused.value.code == "mixed_orientations"
    assert refused.value.details["sop_instance_uids"] == [datasets[3].SOPInstanceUID]

    small = ct_series(volume(size=32), SPACING)
    mixed = ct_series(volume(), SPACING)
    mixed[5] = small[5]
    mixed[5].SeriesInstanceUID = mixed[0].SeriesInstanceUID
    with pytest.raises(InputError) as refused:
        order_slices(decoded(mixed))
    assert refused.value.code == "mixed_sizes"


def test_uneven_spacing_and_too_few_slices_are_refused():
    datasets = ct_series(volume(), SPACING)
    position = datasets[10].ImagePositionPatient
    datasets[10].ImagePositionPatient = [position[0], position[1], float(position[2]) + 0.8]
    with pytest.raises(InputError) as refused:
        order_slices(decoded(datasets))
    assert refused.value.code == "uneven_slice_spacing"
    with pytest.raises(InputError) as refused:
        order_slices(decoded(ct_series(volume(slices=4), SPACING)))
    assert refused.value.code == "too_few_slices"


def test_mixed_series_in_one_request_become_separate_items():
    chest = ct_series(volume(seed=1), SPACING, body_part="CHEST")
    radiograph = build_dataset(np.full((256, 256), 1000, np.uint16), modality="DX", BodyPartExamined="CHEST")
    radiograph.StudyInstanceUID = chest[0].StudyInstanceUID
    images = decoded(chest[::-1] + [radiograph])
    items, unmatched = plan(images, ["cxr_opacity", "cxr_nodule"], None, 512)
    assert unmatched == [] or all(u["looked_at"]["Modality"] == "CT" for u in unmatched)
    image_items = [item for item in items if item.kind == "image"]
    assert [item.first.sop_instance_uid for item in image_items] == [radiograph.SOPInstanceUID]
    assert image_items[0].tools == ["cxr_opacity", "cxr_nodule"]


def test_grid_sampling_keeps_hu_statistics_and_maps_back_to_millimetres():
    rng = np.random.default_rng(3)
    hu = rng.choice([-980.0, -850.0], p=[0.2, 0.8], size=(96, 192, 192))
    grid, geometry = to_grid(hu, (1.25, 0.8, 0.8), (48, 96, 96))
    assert grid.dtype == np.int16
    assert (grid < -950).mean() == pytest.approx(0.2, abs=0.01)  # nearest-neighbour: unbiased shares
    assert geometry.grid_spacing_mm == pytest.approx((2.5, 1.6, 1.6))
    np.testing.assert_array_equal(VolumeGeometry.from_vector(geometry.as_vector()).as_vector(), geometry.as_vector())
    assert geometry.source_slice_of(0) == 1 and geometry.source_slice_of(47) == 95


def test_multipart_parts_are_split_and_checked():
    body = (b"--XyZ\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n"
            b"--XyZ\r\nContent-Type: application/dicom\r\n\r\nB\r\n--XyZ--\r\n")
    parts = multipart_parts(body, 'multipart/related; type="application/dicom"; boundary=XyZ')
    assert parts == [("application/dicom", b"AAA"), ("application/dicom", b"B")]
    with pytest.raises(InputError) as refused:
        multipart_parts(body, "multipart/related")
    assert refused.value.code == "no_boundary"
    with pytest.raises(InputError) as refused:
        multipart_parts(b"--XyZ\r\nContent-Type: application/dicom\r\n\r\nAAA", "multipart/related; boundary=XyZ")
    assert refused.value.code == "malformed_multipart"
