"""Postprocess (calibration, location) and the phantoms' DICOM round trip."""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest

from mosmedai.catalog.imaging import GrayscaleParams, Letterbox, VoiFunction, fit_geometry, preprocess
from mosmedai.catalog.postprocess import NO_LOCATION, Calibration, calibrated_probability, locate, postprocess
from mosmedai.phantoms.chest_xray import TOOLS, heatmap_target, make_phantom, network_input, write_dicom


def _heatmap(*cells: tuple[int, int], value: float = 6.0, background: float = -8.0) -> np.ndarray:
    heatmap = np.full((1, 32, 32), background, np.float32)
    for row, col in cells:
        heatmap[0, row, col] = value
    return heatmap


def test_peak_maps_back_through_a_padded_letterbox():
    # A 500 x 250 source: scale 256/500, fitted 256 x 128, 64 padding columns each side.
    geometry, new_h, new_w = fit_geometry(500, 250)
    assert (new_h, new_w, geometry.pad_top, geometry.pad_left) == (256, 128, 0, 64)
    box = locate(_heatmap((10, 20)), geometry)
    # Cell (10, 20) is network rows [80, 88), columns [160, 168).
    expected = [80 / 0.512, (160 - 64) / 0.512, 88 / 0.512, (168 - 64) / 0.512]
    assert box.dtype == np.float32 and box.shape == (4,)
    np.testing.assert_allclose(box, expected, rtol=1e-5)


def test_peak_maps_back_with_vertical_padding():
    # A landscape source: padding rows instead of columns.
    geometry, _, _ = fit_geometry(300, 600)
    assert geometry.pad_top == 64 and geometry.pad_left == 0
    box = locate(_heatmap((20, 5)), geometry.as_vector())  # the [5] vector form works too
    scale = 256 / 600
    expected = [(160 - 64) / scale, 40 / scale, (168 - 64) / scale, 48 / scale]
    np.testing.assert_allclose(box, expected, rtol=1e-5)


def test_region_spans_connected_cells_and_ignores_a_weaker_far_peak():
    geometry = Letterbox(1.0, 0.0, 0.0, 256.0, 256.0)
    heatmap = _heatmap((10, 10), (10, 11), (11, 10), (11, 11))
    heatmap[0, 25, 25] = 1.0  # sigmoid(1) = 0.73 is above half the peak's 0.998, but not connected to it
    box = locate(heatmap, geometry)
    np.testing.assert_allclose(box, [80, 80, 96, 96], atol=1e-4)


def test_finding_between_two_cells_is_placed_between_them():
    geometry = Letterbox(1.0, 0.0, 0.0, 256.0, 256.0)
    heatmap = _heatmap((10, 10))
    heatmap[0, 10, 11] = 2.0  # weaker neighbour, still above half the peak
    box = locate(heatmap, geometry)
    centre_col = (box[1] + box[3]) / 2
    assert 84.0 < centre_col < 92.0  # between cell 10's centre (84) and cell 11's (92)
    assert box[3] - box[1] == pytest.approx(16.0)


def test_box_is_clipped_to_the_image():
    geometry, _, _ = fit_geometry(500, 250)  # columns 0..63 of the input are padding
    box = locate(_heatmap((31, 8)), geometry)  # cell at network columns 64..72, last row
    assert box[1] == pytest.approx(0.0) and box[2] == pytest.approx(500.0)
    box = locate(_heatmap((0, 2)), geometry)  # wholly inside the padding
    assert box[1] == 0.0 and box[3] == 0.0


def test_probabilities_and_logits_give_the_same_box():
    geometry, _, _ = fit_geometry(400, 380)
    logits = _heatmap((7, 9), (8, 9))
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    np.testing.assert_allclose(locate(logits, geometry), locate(probabilities, geometry), rtol=1e-6)


def test_calibration_load_and_probability(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"a": 0.8, "b": -0.3, "fitted_on": "test", "seed": 1}))
    calibration = Calibration.load(path)
    assert calibration == Calibration(0.8, -0.3)
    logits = np.array([-1000.0, -2.0, 0.0, 3.0, 1000.0], np.float32)
    p = calibrated_probability(logits, calibration)
    assert p.dtype == np.float32 and np.all(np.isfinite(p))
    np.testing.assert_allclose(p[1:4], 1 / (1 + np.exp(-(0.8 * logits[1:4] - 0.3))), rtol=1e-6)
    assert p[0] == 0.0 and p[-1] == 1.0
    path.write_text(json.dumps({"a": float("nan"), "b": 0}))
    with pytest.raises(ValueError):
        Calibration.load(path)


def test_postprocess_positive_and_negative():
    calibration = Calibration(1.0, 0.0)
    geometry, _, _ = fit_geometry(500, 250)
    heatmap = _heatmap((10, 20))
    probability, positive, location = postprocess(
        np.array([2.0], np.float32), heatmap, geometry.as_vector(), calibration, 0.5
    )
    assert probability.dtype == np.float32 and probability.shape == (1,)
    assert positive.dtype == bool and positive.shape == (1,) and positive[0]
    assert location.dtype == np.float32 and location.shape == (4,)
    np.testing.assert_allclose(location, locate(heatmap, geometry))
    assert probability[0] == pytest.approx(1 / (1 + np.exp(-2.0)))

    probability, positive, location = postprocess(
        np.array([-2.0], np.float32), heatmap, geometry.as_vector(), calibration, 0.5
    )
    assert not positive[0]
    np.testing.assert_array_equal(location, NO_LOCATION)
    # The threshold is inclusive: probability == threshold is positive.
    _, positive, _ = postprocess(np.array([0.0], np.float32), heatmap, geometry.as_vector(), calibration, 0.5)
    assert positive[0]


# --------------------------------------------------------------------------------------
# phantoms


def _params_from_dataset(ds: pydicom.Dataset) -> GrayscaleParams:
    """The grayscale chain's header values, read the way a DICOM reader must (PS3.3 C.11)."""
    window = "WindowWidth" in ds and float(ds.WindowWidth) > 0
    function = VoiFunction[str(ds.get("VOILUTFunction", "LINEAR")).upper()] if window else VoiFunction.AUTO
    return GrayscaleParams(
        rescale_slope=float(ds.get("RescaleSlope", 1.0)),
        rescale_intercept=float(ds.get("RescaleIntercept", 0.0)),
        window_center=float(ds.WindowCenter) if window else 0.0,
        window_width=float(ds.WindowWidth) if window else 0.0,
        voi_function=function,
        invert=ds.PhotometricInterpretation == "MONOCHROME1",
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(bits_stored=12, monochrome1=True, rescale=(0.5, -1024.0), voi=VoiFunction.LINEAR),
        dict(bits_stored=16, monochrome1=False, rescale=(1.0, 0.0), voi=VoiFunction.AUTO),
        dict(bits_stored=10, monochrome1=False, rescale=(2.0, 100.0), voi=VoiFunction.LINEAR),
        dict(),  # all random
    ],
)
def test_dicom_round_trip_preprocesses_like_the_phantom(tmp_path, options):
    phantom = make_phantom(77, findings=["cxr_nodule"], **options)
    path = tmp_path / "phantom.dcm"
    write_dicom(phantom, path)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition) == ("DX", "CHEST", "PA")
    assert (ds.Rows, ds.Columns) == phantom.shape
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (
        16,
        phantom.bits_stored,
        phantom.bits_stored - 1,
        0,
    )
    assert ds.PhotometricInterpretation == phantom.photometric_interpretation
    assert float(ds.PixelSpacing[0]) == pytest.approx(phantom.pixel_spacing_mm, rel=1e-6)
    assert ("WindowCenter" in ds) == (phantom.params.voi_function == VoiFunction.LINEAR)
    np.testing.assert_array_equal(ds.pixel_array, phantom.stored)
    params = _params_from_dataset(ds)
    assert params == phantom.params
    image, geometry = preprocess(ds.pixel_array, params)
    expected, expected_geometry = network_input(phantom)
    assert geometry == expected_geometry
    np.testing.assert_array_equal(image, expected)
    if options:
        assert phantom.params.invert == options["monochrome1"]
        assert phantom.bits_stored == options["bits_stored"]


def test_write_dicom_to_a_buffer_with_overrides():
    phantom = make_phantom(5, findings=[])
    buffer = io.BytesIO()
    write_dicom(phantom, buffer, PatientID="ABC", BodyPartExamined=None)
    ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert ds.PatientID == "ABC" and "BodyPartExamined" not in ds
    assert ds.SOPInstanceUID != write_dicom(phantom, io.BytesIO()).SOPInstanceUID  # new UIDs each time


def test_phantoms_are_deterministic_and_ground_truth_is_consistent():
    a, b = make_phantom((9, 1)), make_phantom((9, 1))
    np.testing.assert_array_equal(a.stored, b.stored)
    assert a.params == b.params and a.labels == b.labels and a.boxes == b.boxes
    assert not np.array_equal(make_phantom((9, 2)).stored, a.stored) or make_phantom((9, 2)).shape != a.shape
    phantom = make_phantom(3, findings=TOOLS)
    assert phantom.stored.dtype == np.uint16
    assert phantom.stored.max() <= 2**phantom.bits_stored - 1
    for tool in TOOLS:
        assert phantom.labels[tool]
        r0, c0, r1, c1 = phantom.boxes[tool]
        assert 0 <= r0 < r1 <= phantom.shape[0] and 0 <= c0 < c1 <= phantom.shape[1]
        mask = phantom.masks[tool]
        assert mask[r0:r1, c0:c1].sum() == mask.sum() > 0
        _, geometry = network_input(phantom)
        assert heatmap_target(mask, geometry).sum() >= 1
    empty = make_phantom(3, findings=[])
    assert not any(empty.labels.values()) and all(box is None for box in empty.boxes.values())


def test_full_size_phantom_with_given_spacing():
    phantom = make_phantom(11, shape=(2500, 2048), pixel_spacing_mm=0.168, findings=["cxr_pneumothorax"])
    assert phantom.shape == (2500, 2048) and phantom.pixel_spacing_mm == 0.168
    assert phantom.labels["cxr_pneumothorax"] and phantom.masks["cxr_pneumothorax"].shape == (2500, 2048)
    image, geometry = network_input(phantom)
    assert image.shape == (256, 256) and geometry.height == 2500
