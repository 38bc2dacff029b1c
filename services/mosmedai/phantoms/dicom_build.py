"""Builds DICOM Part-10 files from pixel arrays: examples, tests and load generation.

Never used on the serving path; results (SR, secondary capture) are built with highdicom.
"""

from __future__ import annotations

import copy
import io
from datetime import datetime, timezone

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

#: Digital X-Ray Image Storage - For Presentation (PS3.4 B.5).
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def build_dataset(pixels: np.ndarray, *, modality: str = "DX", bits_stored: int | None = None,
                  photometric: str = "MONOCHROME2", **attributes) -> Dataset:
    """A single-frame grayscale image; ``attributes`` are DICOM keywords (e.g. WindowCenter)."""
    if pixels.ndim != 2:
        raise ValueError(f"one 2-D frame expected, got {pixels.shape}")
    signed = pixels.dtype.kind == "i"
    bits_allocated = 8 if pixels.dtype.itemsize == 1 else 16
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.SOPClassUID = DX_FOR_PRESENTATION
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.FrameOfReferenceUID = generate_uid()
    now = datetime.now(timezone.utc)
    dataset.StudyDate = dataset.SeriesDate = dataset.ContentDate = dataset.AcquisitionDate = now.strftime("%Y%m%d")
    dataset.StudyTime = dataset.SeriesTime = dataset.ContentTime = dataset.AcquisitionTime = now.strftime("%H%M%S")
    # UTF-8, so Cyrillic series descriptions (ОГК, ФЛГ) survive; ASCII is a subset of it.
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.PatientID = "SYNTHETIC"
    dataset.PatientName = "Synthetic^Phantom"
    dataset.Modality = modality
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = bits_allocated
    dataset.BitsStored = bits_stored or bits_allocated
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = 1 if signed else 0
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    return dataset


def to_bytes(dataset: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Part-10 bytes in the given transfer syntax (compressed ones through pydicom's encoders)."""
    dataset = copy.deepcopy(dataset)  # compress() and the byte swap change it in place
    buffer = io.BytesIO()
    if transfer_syntax in (ExplicitVRBigEndian, ImplicitVRLittleEndian):
        pixels = dataset.pixel_array
        big_endian = transfer_syntax == ExplicitVRBigEndian
        # A fresh Dataset: one read from a file refuses to change its encoding.
        fresh = Dataset({element.tag: element for element in dataset})
        fresh.file_meta = dataset.file_meta
        fresh.file_meta.TransferSyntaxUID = transfer_syntax
        fresh.PixelData = pixels.astype(pixels.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
        fresh.save_as(buffer, enforce_file_format=True, little_endian=not big_endian,
                      implicit_vr=not big_endian)
    else:
        if transfer_syntax != ExplicitVRLittleEndian:
            dataset.compress(transfer_syntax)
        dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


#: CT Image Storage (PS3.4 B.5).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def ct_series(hu: np.ndarray, spacing_mm: tuple[float, float, float], *, body_part: str = "CHEST",
              series_description: str = "", study_instance_uid: str | None = None,
              rescale_intercept: float = -1024.0, **attributes) -> list[Dataset]:
    """One axial CT series from a volume in HU (slices, rows, columns), slice 0 at the feet.

    ``spacing_mm`` is (between slices, between rows, between columns). Stored values are
    unsigned 16-bit with Rescale Intercept ``rescale_intercept`` (slope 1), Image Position
    (Patient) advances along +z by the slice spacing, Instance Number counts from 1.
    """
    if hu.ndim != 3:
        raise ValueError(f"a volume is 3-D (slices, rows, columns), got shape {hu.shape}")
    dz, dy, dx = spacing_mm
    stored = np.clip(np.rint(hu - rescale_intercept), 0, 4095).astype(np.uint16)
    study = study_instance_uid or generate_uid()
    series, frame = generate_uid(), generate_uid()
    datasets = []
    for index, plane in enumerate(stored):
        dataset = build_dataset(
            plane, modality="CT", bits_stored=12,
            StudyInstanceUID=study, SeriesInstanceUID=series, FrameOfReferenceUID=frame,
            BodyPartExamined=body_part, SeriesDescription=series_description,
            RescaleSlope=1, RescaleIntercept=_decimal(rescale_intercept), RescaleType="HU",
            PixelSpacing=[_decimal(dy), _decimal(dx)], SliceThickness=_decimal(dz),
            SpacingBetweenSlices=_decimal(dz),
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            ImagePositionPatient=[_decimal(-dx * plane.shape[1] / 2), _decimal(-dy * plane.shape[0] / 2),
                                  _decimal(index * dz)],
            InstanceNumber=index + 1, SeriesNumber=1, **attributes,
        )
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        datasets.append(dataset)
    return datasets


def _decimal(value: float) -> str:
    """A Decimal String value (at most 16 characters)."""
    return f"{value:.6g}"
