"""What the DIMSE door accepts, and the checks of each C-STORE before it is stored: the SOP
classes and transfer syntaxes offered, the C-STORE statuses (PS3.4 B.2.3) and how the domain
errors map to them (``dimse_status``)."""

from __future__ import annotations

import io
import re
import struct

from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from mosmedai.pipeline.errors import InputError, Refused, ToolsFailed

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

#: SOP class -> the Modality values its IOD allows (PS3.3 A.2, A.26, A.27, A.3).
#: Not accepted: Enhanced CT (multi-frame; the CT path reads one slice per instance),
#: Secondary Capture (no acquisition facts to route on), DX/MG for intra-oral and MG for
#: processing (no tool reads them).
STORAGE_SOP_CLASSES: dict[str, frozenset[str]] = {
    CR_IMAGE_STORAGE: frozenset({"CR"}),
    DX_FOR_PRESENTATION: frozenset({"DX"}),
    DX_FOR_PROCESSING: frozenset({"DX"}),
    MG_FOR_PRESENTATION: frozenset({"MG"}),
    CT_IMAGE_STORAGE: frozenset({"CT"}),
}

#: Uncompressed little endian, JPEG baseline / extended / lossless, JPEG-LS lossless,
#: JPEG 2000 (lossless and lossy), RLE. Not offered: Explicit VR Big Endian (retired) and
#: Deflated (nobody sends images deflated); a peer then falls back to Implicit VR LE.
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110
STORE_SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})  # success and warnings

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason.
REJECTED_PERMANENT = 0x01
SERVICE_USER = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
REASON_CALLED_AE_NOT_RECOGNISED = 0x07

PIXEL_DATA = 0x7FE00010
PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"
UNDEFINED_LENGTH = 0xFFFFFFFF
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # PS3.5 9.1 (at most 64 characters, checked apart)





class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _read_header(raw: bytes, implicit: bool) -> tuple[Dataset, int | None]:
    """The data set's elements before Pixel Data, and the offset of Pixel Data (or None).

    pydicom reads a damaged data set without complaint (a value cut short is simply shorter);
    here every top-level element must hold the bytes its length says.
    """
    stream = io.BytesIO(raw)
    elements = {}
    try:
        for element in data_element_generator(stream, implicit, True,
                                              stop_when=lambda tag, vr, length: tag == PIXEL_DATA):
            length = getattr(element, "length", None)
            value = element.value
            if length is not None and length != UNDEFINED_LENGTH and isinstance(value, bytes) \
                    and len(value) != length:
                raise _Refused(CANNOT_UNDERSTAND, f"element {element.tag} is cut short or its length is "
                                                  f"wrong ({len(value)} of {length} bytes)")
            elements[element.tag] = element
    except _Refused:
        raise
    except Exception as error:  # pydicom raises many types on a damaged data set
        raise _Refused(CANNOT_UNDERSTAND, f"the data set cannot be parsed: {error}") from None
    offset = stream.tell()
    return Dataset(elements), (offset if raw[offset:offset + 4] == PIXEL_DATA_TAG_LE else None)


def _check_pixel_data(raw: bytes, offset: int, implicit: bool, compressed: bool, needed: int) -> None:
    header = 8 if implicit else 12
    if len(raw) < offset + header:
        raise _Refused(CANNOT_UNDERSTAND, "the data set ends inside the Pixel Data element's header")
    (length,) = struct.unpack_from("<I", raw, offset + header - 4)
    if length == UNDEFINED_LENGTH:
        if not compressed:
            raise _Refused(CANNOT_UNDERSTAND, "encapsulated Pixel Data in an uncompressed transfer syntax")
        if raw.rfind(SEQUENCE_DELIMITER, offset + header) < 0:
            raise _Refused(CANNOT_UNDERSTAND, "the encapsulated Pixel Data has no sequence delimiter (cut short)")
        return
    if compressed:
        raise _Refused(CANNOT_UNDERSTAND, "native Pixel Data in a compressed transfer syntax")
    if offset + header + length > len(raw):
        raise _Refused(CANNOT_UNDERSTAND, f"the Pixel Data is cut short ({len(raw) - offset - header} of "
                                          f"{length} bytes)")
    if length < needed:
        raise _Refused(DOES_NOT_MATCH_SOP_CLASS, f"the Pixel Data holds {length} bytes; the image attributes "
                                                 f"need {needed}")


def check_instance(raw: bytes, transfer_syntax: str, affected_sop_class: str,
                   affected_sop_instance: str) -> Dataset:
    """Check a received data set (as sent, without file meta) against its SOP class.

    Returns the header (elements before Pixel Data). Raises :class:`_Refused` with 0xC000
    (cannot be parsed) or 0xA900 (does not match the SOP class).
    """
    implicit = transfer_syntax == ImplicitVRLittleEndian
    compressed = transfer_syntax not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
    dataset, pixel_offset = _read_header(raw, implicit)
    try:
        sop_class = str(dataset.get("SOPClassUID", "") or "").strip()
        sop_instance = str(dataset.get("SOPInstanceUID", "") or "").strip()
        modality = str(dataset.get("Modality", "") or "").strip().upper()
        numbers = {key: int(dataset.get(key, 0) or 0)
                   for key in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel")}
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        uids = {key: str(dataset.get(key, "") or "").strip() for key in ("StudyInstanceUID", "SeriesInstanceUID")}
    except Exception as error:  # a value pydicom cannot convert
        raise _Refused(CANNOT_UNDERSTAND, f"the data set cannot be parsed: {error}") from None
    if sop_class != affected_sop_class:
        raise _Refused(DOES_NOT_MATCH_SOP_CLASS,
                       f"SOP Class UID {sop_class or '(none)'} differs from the request's {affected_sop_class}")
    if sop_instance != affected_sop_instance:
        raise _Refused(DOES_NOT_MATCH_SOP_CLASS,
                       f"SOP Instance UID {sop_instance or '(none)'} differs from the request's "
                       f"{affected_sop_instance}")
    allowed = STORAGE_SOP_CLASSES[affected_sop_class]
    if modality not in allowed:
        raise _Refused(DOES_NOT_MATCH_SOP_CLASS,
                       f"Modality {modality or '(none)'} is not allowed for SOP class {affected_sop_class} "
                       f"({', '.join(sorted(allowed))})")
    missing = [key for key, value in uids.items() if not value]
    bad = [f"{key} {value!r}" for key, value in {**uids, "SOPInstanceUID": sop_instance}.items()
           if value and (len(value) > 64 or not _UID.match(value))]
    if bad:
        raise _Refused(DOES_NOT_MATCH_SOP_CLASS, f"not a DICOM UID: {', '.join(bad)}")
    missing += [key for key in ("Rows", "Columns", "BitsAllocated") if numbers[key] <= 0]
    if pixel_offset is None:
        missing.append("PixelData")
    if missing:
        raise _Refused(DOES_NOT_MATCH_SOP_CLASS, f"required attributes missing: {', '.join(missing)}")
    needed = (numbers["Rows"] * numbers["Columns"] * max(1, numbers["SamplesPerPixel"]) * max(1, frames)
              * numbers["BitsAllocated"] + 7) // 8
    _check_pixel_data(raw, pixel_offset, implicit, compressed, needed)
    return dataset



def _status(code: int, comment: str) -> tuple[int, Dataset] | int:
    """A C-STORE status with Error Comment (0000,0902, at most 64 characters)."""
    if code == SUCCESS:
        return SUCCESS
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status




def dimse_status(error: Exception) -> int:
    """The C-STORE status of a domain error: the instance cannot be stored now (503, 429, 413:
    0xA700 out of resources, the sender retries later), or never as it is (any other refusal of
    the instance: 0xC000 cannot understand). Every door maps the same errors (tests)."""
    if not isinstance(error, (InputError, ToolsFailed, Refused)):
        raise TypeError(f"not a domain error: {error!r}")
    if error.status in (413, 429, 503, 504):
        return OUT_OF_RESOURCES
    if isinstance(error, InputError) and error.code in ("sop_class_mismatch", "study_mismatch"):
        return DOES_NOT_MATCH_SOP_CLASS
    if error.status >= 500:
        return PROCESSING_FAILURE
    return CANNOT_UNDERSTAND
