"""DICOM decoding and the refusal of every kind of bad input (mosmedai.pipeline.dicom_input)."""

import io

import numpy as np
import pytest
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from mosmedai.phantoms.dicom_build import build_dataset, to_bytes
from mosmedai.pipeline.errors import InputError
from mosmedai.pipeline.dicom_input import decode
from mosmedai.catalog.imaging import VoiFunction, fit_geometry, preprocess

MAX_PIXELS = 64 * 1024 * 1024


def gradient(shape=(300, 240), bits=12, dtype=np.uint16):
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    values = (rows * 7 + cols * 3) % (1 << bits)
    return values.astype(dtype)


@pytest.mark.parametrize(
    "syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless, JPEG2000Lossless,
     JPEGLSLossless],
)
def test_every_transfer_syntax_decodes_to_the_same_stored_values(syntax):
    pixels = gradient()
    body = to_bytes(build_dataset(pixels, bits_stored=12, BodyPartExamined="CHEST"), syntax)
    image = decode(body, MAX_PIXELS)
    assert image.transfer_syntax == syntax
    np.testing.assert_array_equal(image.stored, pixels)
    assert image.facts.modality == "DX" and image.facts.body_part == "CHEST"


def test_signed_pixels_shift_into_uint16_and_keep_their_values():
    pixels = (gradient(bits=12).astype(np.int32) - 2048).astype(np.int16)
    body = to_bytes(build_dataset(pixels, bits_stored=16, RescaleSlope=2, RescaleIntercept=-10))
    image = decode(body, MAX_PIXELS)
    assert image.stored.dtype == np.uint16
    # Modality LUT output must be the same whether computed from signed or shifted values.
    expected = pixels.astype(np.float64) * 2 - 10
    got = image.stored.astype(np.float64) * image.params.rescale_slope + image.params.rescale_intercept
    np.testing.assert_allclose(got, expected)


def test_window_monochrome1_and_voi_function_are_read():
    body = to_bytes(build_dataset(gradient(), photometric="MONOCHROME1", WindowCenter=[1000, 500],
                                  WindowWidth=[2000, 800], VOILUTFunction="SIGMOID"))
    params = decode(body, MAX_PIXELS).params
    assert params.invert and params.voi_function == VoiFunction.SIGMOID
    assert (params.window_center, params.window_width) == (1000, 2000)  # the first of several


def test_monochrome1_preprocesses_to_the_inverse_of_monochrome2():
    pixels = gradient()
    mono2 = decode(to_bytes(build_dataset(pixels, WindowCenter=2048, WindowWidth=4096)), MAX_PIXELS)
    mono1 = decode(to_bytes(build_dataset(pixels, photometric="MONOCHROME1", WindowCenter=2048,
                                          WindowWidth=4096)), MAX_PIXELS)
    a, _ = preprocess(mono2.stored, mono2.params)
    b, _ = preprocess(mono1.stored, mono1.params)
    geometry, new_h, new_w = fit_geometry(*pixels.shape)
    top, left = int(geometry.pad_top), int(geometry.pad_left)
    inside = (slice(top, top + new_h), slice(left, left + new_w))
    np.testing.assert_allclose(a[inside] + b[inside], 1.0, atol=1e-5)


def test_eight_bit_images_are_accepted():
    image = decode(to_bytes(build_dataset(gradient(bits=8, dtype=np.uint8))), MAX_PIXELS)
    assert image.stored.dtype == np.uint16 and image.stored.max() == 255


def test_voi_lut_sequence_becomes_a_table():
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = np.arange(0, 65536, 16, dtype="<u2").tobytes()
    dataset = build_dataset(gradient(), VOILUTSequence=[item])
    params = decode(to_bytes(dataset), MAX_PIXELS).params
    assert params.voi_function == VoiFunction.TABLE and len(params.lut) == 4096


BAD_INPUTS = {
    "empty": (b"", 400, "empty_body"),
    "not dicom": (b"hello, this is not an image" * 20, 422, "not_dicom"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bodies_that_are_not_dicom_are_refused(name):
    body, status, code = BAD_INPUTS[name]
    with pytest.raises(InputError) as caught:
        decode(body, MAX_PIXELS)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_truncated_file_is_refused_with_422():
    body = to_bytes(build_dataset(gradient()))
    with pytest.raises(InputError) as caught:
        decode(body[: len(body) // 2], MAX_PIXELS)
    assert caught.value.status == 422
    assert "pixel" in caught.value.message.lower() or "parsed" in caught.value.message


def test_missing_pixel_data_is_named():
    dataset = build_dataset(gradient())
    del dataset.PixelData
    with pytest.raises(InputError) as caught:
        decode(to_bytes(dataset), MAX_PIXELS)
    assert caught.value.code == "no_pixel_data" and "(7FE0,0010)" in caught.value.message


def test_undecodable_transfer_syntax_is_named():
    from pydicom.encaps import encapsulate

    # MPEG2 Main Profile (PS3.5 A.4.5): a valid syntax that no installed decoder reads.
    dataset = build_dataset(gradient())
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    dataset.PixelData = encapsulate([b"\xff\x0a" + bytes(64)])
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    with pytest.raises(InputError) as caught:
        decode(buffer.getvalue(), MAX_PIXELS)
    assert caught.value.status == 422 and "1.2.840.10008.1.2.4.100" in caught.value.message


def test_colour_and_oversized_images_are_refused():
    rgb = build_dataset(gradient(bits=8, dtype=np.uint8))
    rgb.SamplesPerPixel = 3
    with pytest.raises(InputError) as caught:
        decode(to_bytes(rgb), MAX_PIXELS)
    assert caught.value.code == "not_grayscale"
    with pytest.raises(InputError) as caught:
        decode(to_bytes(build_dataset(gradient())), max_pixels=1000)
    assert caught.value.code == "image_too_large" and "1000" in caught.value.message


def test_missing_uid_is_named():
    dataset = build_dataset(gradient())
    del dataset.StudyInstanceUID
    with pytest.raises(InputError) as caught:
        decode(to_bytes(dataset), MAX_PIXELS)
    assert "StudyInstanceUID (0020,000D)" in caught.value.message


@pytest.mark.parametrize("signed", [False, True])
def test_bits_above_bits_stored_are_not_part_of_the_value(signed):
    values = (gradient(bits=12).astype(np.int32) - (2048 if signed else 0))
    pixels = values.astype(np.int16 if signed else np.uint16)
    noisy = pixels.view(np.uint16).copy()
    noisy |= np.uint16(0xA000)  # garbage in the four unused high bits (an old overlay, say)
    if not signed:
        noisy &= np.uint16(0xAFFF)
    dataset = build_dataset(noisy.view(pixels.dtype), bits_stored=12)
    image = decode(to_bytes(dataset), MAX_PIXELS)
    expected = values + (32768 if signed else 0)
    np.testing.assert_array_equal(image.stored.astype(np.int32), expected)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_uncompressed_pixel_data_cut_short_is_named(syntax):
    body = to_bytes(build_dataset(gradient()), syntax)
    with pytest.raises(InputError) as caught:
        decode(body[:-10], MAX_PIXELS)
    assert caught.value.code == "corrupt_pixel_data" and "truncated" in caught.value.message


def test_a_view_of_the_body_is_decoded_without_copying():
    body = to_bytes(build_dataset(gradient()))
    image = decode(body, MAX_PIXELS)
    assert not image.stored.flags.owndata  # frombuffer over the request body


def test_uncompressed_files_are_told_apart_from_compressed_ones():
    from mosmedai.pipeline.dicom_input import is_uncompressed

    pixels = gradient()
    assert is_uncompressed(to_bytes(build_dataset(pixels)))
    assert is_uncompressed(to_bytes(build_dataset(pixels), ImplicitVRLittleEndian))
    assert not is_uncompressed(to_bytes(build_dataset(pixels), RLELossless))
    assert not is_uncompressed(to_bytes(build_dataset(pixels), ExplicitVRBigEndian))
    assert not is_uncompressed(b"not dicom") and not is_uncompressed(b"")
