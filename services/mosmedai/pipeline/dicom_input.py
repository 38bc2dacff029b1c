"""DICOM Part-10 bytes -> one frame of stored values plus the header facts the tools need.

Everything a sender can get wrong ends here as an :class:`InputError` with an HTTP status
and a message that names the problem; nothing below raises anything else for bad input.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from mosmedai.catalog.imaging import SIGNED_SHIFT, GrayscaleParams, VoiFunction
from mosmedai.catalog.tools import HeaderFacts
from mosmedai.pipeline.errors import InputError

PIXEL_DATA = 0x7FE00010
PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as a little-endian file stores it
NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})


@dataclass
class DecodedImage:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    facts: HeaderFacts
    stored: np.ndarray  # (rows, columns) uint16 stored values, shifted if signed
    params: GrayscaleParams
    pixel_spacing_mm: tuple[float, float] | None
    acquired_at: datetime | None
    transfer_syntax: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: CT slice geometry (None when the header has none): Image Position / Orientation (Patient)
    position_mm: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None
    instance_number: int | None = None
    #: the header without pixel data (result objects copy patient and study attributes from it)
    header: pydicom.Dataset | None = None

    def hu(self) -> np.ndarray:
        """Stored values through the Modality LUT (Rescale Slope/Intercept): HU for CT, float32."""
        return self.stored.astype(np.float32) * self.params.rescale_slope + self.params.rescale_intercept


def _text(dataset: pydicom.Dataset, keyword: str) -> str:
    value = dataset.get(keyword, "")
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if value else ""
    return str(value or "").strip().upper()


def _first_number(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def header_facts(dataset: pydicom.Dataset) -> HeaderFacts:
    facts = {
        "Modality": _text(dataset, "Modality"),
        "BodyPartExamined": _text(dataset, "BodyPartExamined"),
        "ViewPosition": _text(dataset, "ViewPosition"),
        "ImageLaterality": _text(dataset, "ImageLaterality") or _text(dataset, "Laterality"),
        "SeriesDescription": _text(dataset, "SeriesDescription"),
    }
    return HeaderFacts(
        modality=facts["Modality"],
        body_part=facts["BodyPartExamined"],
        view_position=facts["ViewPosition"],
        laterality=facts["ImageLaterality"],
        series_description=facts["SeriesDescription"],
        looked_at={key: value for key, value in facts.items()},
    )


def is_uncompressed(body: bytes) -> bool:
    """Whether the file meta names an uncompressed little-endian transfer syntax (False for
    anything unreadable: `decode` then says what is wrong)."""
    try:
        # The file meta group (PS3.10 7.1) and one tag of the dataset: ~0.2 ms.
        dataset = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:
        return False
    return dataset.file_meta.get("TransferSyntaxUID") in NATIVE_LITTLE_ENDIAN


def read_dataset(body: bytes, stop_before_pixels: bool = False) -> tuple[pydicom.Dataset, int]:
    """Parse a Part-10 file (PS3.10 7.1: 128-byte preamble, 'DICM', file meta).

    Returns the dataset and the offset in ``body`` where parsing stopped: with
    ``stop_before_pixels``, the Pixel Data element's tag when there is one.
    """
    if not body:
        raise InputError(400, "empty_body", "the request body is empty; send one DICOM Part-10 file")
    stream = io.BytesIO(body)
    try:
        dataset = pydicom.dcmread(stream, force=False, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise InputError(
            422,
            "not_dicom",
            "the body is not a DICOM Part-10 file (no 'DICM' prefix after the 128-byte preamble)",
        ) from None
    except Exception as error:  # pydicom raises many types on a damaged file
        raise InputError(422, "unreadable_dicom", f"the DICOM file cannot be parsed: {error}") from None
    meta = getattr(dataset, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise InputError(422, "no_transfer_syntax", "the file meta has no Transfer Syntax UID (0002,0010)")
    return dataset, stream.tell()


def _uid(dataset: pydicom.Dataset, keyword: str) -> str:
    value = str(dataset.get(keyword, "") or "").strip()
    if not value:
        tag = pydicom.datadict.tag_for_keyword(keyword)
        raise InputError(422, "missing_attribute", f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X}) is missing")
    return value


def grayscale_params(dataset: pydicom.Dataset, signed: bool) -> GrayscaleParams:
    slope = _first_number(dataset.get("RescaleSlope")) or 1.0
    intercept = _first_number(dataset.get("RescaleIntercept")) or 0.0
    if signed:
        intercept -= slope * SIGNED_SHIFT
    invert = _text(dataset, "PhotometricInterpretation") == "MONOCHROME1"

    voi_lut_sequence = dataset.get("VOILUTSequence")
    if voi_lut_sequence:
        item = voi_lut_sequence[0]
        descriptor = [int(v) for v in item.LUTDescriptor]
        # PS3.3 C.11.2.1.1: first mapped value is signed when the pixel data are signed.
        first_mapped = descriptor[1] - 65536 if signed and descriptor[1] > 32767 else descriptor[1]
        data = item.LUTData
        # LUT Data is OW (bytes) in most files, a list of US values in some.
        table = (np.frombuffer(data, "<u2") if isinstance(data, bytes) else np.asarray(data)).astype(np.float32)
        return GrayscaleParams(slope, intercept, invert=invert, voi_function=VoiFunction.TABLE,
                               lut_first_mapped=float(first_mapped), lut=table)

    center = _first_number(dataset.get("WindowCenter"))
    width = _first_number(dataset.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = {
            "LINEAR_EXACT": VoiFunction.LINEAR_EXACT,
            "SIGMOID": VoiFunction.SIGMOID,
        }.get(_text(dataset, "VOILUTFunction"), VoiFunction.LINEAR)
        return GrayscaleParams(slope, intercept, center, width, function, invert)
    return GrayscaleParams(slope, intercept, invert=invert)


def _acquired_at(dataset: pydicom.Dataset) -> datetime | None:
    """Acquisition time for time-to-result; the header has no zone, so UTC is assumed."""
    stamp = str(dataset.get("AcquisitionDateTime", "") or "")
    if not stamp:
        date, time = str(dataset.get("AcquisitionDate", "") or ""), str(dataset.get("AcquisitionTime", "") or "")
        stamp = date + time if date and time else ""
    try:
        return pydicom.valuerep.DT(stamp).replace(tzinfo=timezone.utc) if stamp else None
    except ValueError:
        return None


def _native_frame(body: bytes, offset: int, syntax: str, rows: int, columns: int, bits_allocated: int,
                  signed: bool) -> np.ndarray:
    """The first frame of uncompressed little-endian pixel data: a view of ``body``, no copy.

    Uncompressed radiographs are 10 MB; pydicom would copy them twice on the way.
    PS3.5 7.1.2: an explicit-VR OB/OW element has a 12-byte header, implicit VR 8 bytes.
    """
    header = 12 if syntax == ExplicitVRLittleEndian else 8
    if len(body) < offset + header:
        raise InputError(422, "corrupt_pixel_data", "the file ends inside the Pixel Data element's header")
    (length,) = struct.unpack_from("<I", body, offset + header - 4)
    bytes_per_pixel = bits_allocated // 8
    needed = rows * columns * bytes_per_pixel
    if length == 0xFFFFFFFF:
        raise InputError(422, "corrupt_pixel_data",
                         f"encapsulated (compressed) pixel data in the uncompressed transfer syntax {syntax}")
    available = min(length, len(body) - offset - header)
    if available < needed:
        raise InputError(422, "corrupt_pixel_data",
                         f"the pixel data holds {available} bytes; one {rows} x {columns} frame of "
                         f"{bits_allocated}-bit pixels needs {needed} (truncated file?)")
    dtype = np.dtype(("<i" if signed else "<u") + str(bytes_per_pixel))
    return np.frombuffer(body, dtype, count=rows * columns, offset=offset + header).reshape(rows, columns)


def _mask_unused_bits(stored: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Clear (unsigned) or sign-extend (signed) the bits above Bits Stored.

    Checked first with one read-only pass: most files have nothing there, and a view of
    the request body then stays a view.
    """
    unused = stored.dtype.itemsize * 8 - bits_stored
    if unused <= 0 or bits_stored <= 0:
        return stored
    if signed:
        limit = 1 << (bits_stored - 1)
        if -limit <= int(stored.min()) and int(stored.max()) < limit:
            return stored
    elif int(stored.max()) < (1 << bits_stored):
        return stored
    if not stored.flags.writeable:
        stored = stored.copy()
    if signed:
        np.left_shift(stored, unused, out=stored)
        np.right_shift(stored, unused, out=stored)  # arithmetic shift: sign-extends
    else:
        np.bitwise_and(stored, stored.dtype.type((1 << bits_stored) - 1), out=stored)
    return stored


def decode(body: bytes, max_pixels: int) -> DecodedImage:
    """Parse, check and decode one single-frame grayscale image (the first frame of several)."""
    dataset, pixel_offset = read_dataset(body, stop_before_pixels=True)
    transfer_syntax = dataset.file_meta.TransferSyntaxUID
    facts = header_facts(dataset)
    uids = [_uid(dataset, key) for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]

    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise InputError(
            422, "not_grayscale", f"Samples per Pixel is {samples}; the tools read grayscale images (1)"
        )
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    if rows < 16 or columns < 16:
        raise InputError(422, "image_too_small", f"Rows x Columns is {rows} x {columns}; at least 16 x 16")
    if rows * columns > max_pixels:
        raise InputError(
            422, "image_too_large", f"Rows x Columns is {rows} x {columns}, above the limit of {max_pixels} pixels"
        )
    bits_allocated = int(dataset.get("BitsAllocated", 0) or 0)
    if bits_allocated not in (8, 16):
        raise InputError(
            422, "unsupported_bit_depth", f"Bits Allocated is {bits_allocated}; the tools read 8 or 16"
        )
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    signed = int(dataset.get("PixelRepresentation", 0) or 0) == 1

    if transfer_syntax in NATIVE_LITTLE_ENDIAN:
        if body[pixel_offset : pixel_offset + 4] != PIXEL_DATA_TAG_LE:
            raise InputError(422, "no_pixel_data", "the DICOM file has no Pixel Data (7FE0,0010)")
        stored = _native_frame(body, pixel_offset, transfer_syntax, rows, columns, bits_allocated, signed)
    else:
        dataset, _ = read_dataset(body)
        if PIXEL_DATA not in dataset:
            raise InputError(422, "no_pixel_data", "the DICOM file has no Pixel Data (7FE0,0010)")
        try:
            # pydicom's own masking of unused high bits takes several full-size passes;
            # _mask_unused_bits does the same in one (PS3.5 8.1.1: bits above Bits Stored
            # are not part of the value).
            stored = pixel_array(dataset, correct_unused_bits=False)
        except NotImplementedError as error:
            name = getattr(transfer_syntax, "name", str(transfer_syntax))
            raise InputError(
                422,
                "undecodable_transfer_syntax",
                f"pixel data in transfer syntax {transfer_syntax} ({name}) cannot be decoded: {error}",
            ) from None
        except Exception as error:  # truncated or corrupt pixel data
            raise InputError(422, "corrupt_pixel_data", f"the pixel data cannot be decoded: {error}") from None
        if frames > 1:
            stored = stored[0]
        if stored.shape != (rows, columns):
            raise InputError(
                422, "corrupt_pixel_data", f"decoded frame is {stored.shape}, the header says {rows} x {columns}"
            )

    stored = _mask_unused_bits(stored, int(dataset.get("BitsStored", bits_allocated) or bits_allocated), signed)
    if "ModalityLUTSequence" in dataset:
        # Rare in radiography; applied here so the tensor stays plain stored-like values.
        stored = np.clip(apply_modality_lut(stored, dataset), 0, 65535).astype(np.uint16)
        params = grayscale_params(dataset, signed=False)
        params = GrayscaleParams(1.0, 0.0, params.window_center, params.window_width,
                                 params.voi_function, params.invert, params.lut_first_mapped, params.lut)
    else:
        if signed:
            # int16 -> uint16 by flipping the sign bit: the same as adding 32768 (SIGNED_SHIFT).
            stored = (stored.astype(np.int16, copy=False).view(np.uint16) ^ np.uint16(0x8000))
        elif stored.dtype != np.uint16:
            stored = stored.astype(np.uint16)
        params = grayscale_params(dataset, signed=signed)

    spacing = dataset.get("PixelSpacing") or dataset.get("ImagerPixelSpacing")
    pixel_spacing = (float(spacing[0]), float(spacing[1])) if spacing and len(spacing) == 2 else None
    position, orientation = dataset.get("ImagePositionPatient"), dataset.get("ImageOrientationPatient")
    number = _first_number(dataset.get("InstanceNumber"))
    if "PixelData" in dataset:
        del dataset.PixelData  # the header is kept; the pixels live in `stored`
    return DecodedImage(
        study_instance_uid=uids[0],
        series_instance_uid=uids[1],
        sop_instance_uid=uids[2],
        facts=facts,
        stored=np.ascontiguousarray(stored),
        params=params,
        pixel_spacing_mm=pixel_spacing,
        acquired_at=_acquired_at(dataset),
        transfer_syntax=str(transfer_syntax),
        position_mm=tuple(float(v) for v in position) if position and len(position) == 3 else None,
        orientation=tuple(float(v) for v in orientation) if orientation and len(orientation) == 6 else None,
        instance_number=None if number is None else int(number),
        header=dataset,
    )
