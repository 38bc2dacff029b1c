"""The grayscale chain and the fit to the network input (mosmedai.catalog.imaging)."""

import numpy as np
import pytest

from mosmedai.catalog.imaging import GrayscaleParams, VoiFunction, fit_geometry, preprocess, reduce_for_transport


def test_transport_reduction_averages_whole_blocks_and_says_how_to_map_back():
    stored = np.arange(2500 * 2048, dtype=np.uint32).reshape(2500, 2048) % 4096
    reduced, rows, cols = reduce_for_transport(stored.astype(np.uint16), 512)
    assert (rows, cols) == (5.0, 5.0) and reduced.shape == (500, 409)
    block = stored[5:10, 15:20].mean()
    assert reduced[1, 3] == pytest.approx(block, abs=0.5)
    small = np.zeros((300, 200), np.uint16)
    assert reduce_for_transport(small, 512)[0] is small


def test_preprocess_fits_any_aspect_into_the_square_and_keeps_the_geometry():
    stored = np.full((1000, 400), 3000, np.uint16)
    image, geometry = preprocess(stored, GrayscaleParams(window_center=1500, window_width=1000,
                                                         voi_function=VoiFunction.LINEAR))
    assert image.shape == (256, 256)
    _, new_h, new_w = fit_geometry(1000, 400)
    assert (new_h, new_w) == (256, 102) and geometry.pad_left == 77
    assert image[:, 77:179].min() == 1.0 and image[:, :77].max() == 0.0  # bright inside, black padding
    assert geometry.to_source(0, 77) == (0.0, 0.0)


@pytest.mark.parametrize(
    "function, expected",
    [(VoiFunction.LINEAR, 0.5), (VoiFunction.LINEAR_EXACT, 0.5), (VoiFunction.SIGMOID, 0.5)],
)
def test_window_functions_map_the_centre_to_mid_grey(function, expected):
    stored = np.full((64, 64), 1000, np.uint16)
    image, _ = preprocess(stored, GrayscaleParams(window_center=1000.5 if function == VoiFunction.LINEAR else 1000,
                                                  window_width=401, voi_function=function))
    assert image[128, 128] == pytest.approx(expected, abs=0.01)


def test_rescale_then_window_follow_the_dicom_order():
    # HU = 2 * stored - 1024; a lung window (-600 +- 750) puts HU -600 at mid grey.
    stored = np.full((64, 64), 212, np.uint16)  # 2 * 212 - 1024 = -600
    params = GrayscaleParams(2.0, -1024.0, -600.0, 1500.0, VoiFunction.LINEAR_EXACT)
    assert preprocess(stored, params)[0][128, 128] == pytest.approx(0.5, abs=0.01)


def test_params_round_trip_through_the_tensor():
    params = GrayscaleParams(1.5, -20.0, 300.0, 900.0, VoiFunction.TABLE, True, 10.0,
                             np.linspace(0, 1, 50, dtype=np.float32))
    again = GrayscaleParams.from_vector(params.as_vector(), np.pad(params.lut, (0, 7)))
    assert again.invert and again.voi_function == VoiFunction.TABLE
    np.testing.assert_array_equal(again.lut, params.lut)
