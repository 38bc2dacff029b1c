"""The integrator paths' bodies: valid multipart/related DICOM, one study each, right instance counts."""
from __future__ import annotations

import io

import pydicom
import pytest

from mosmedai.pipeline.multipart import multipart_parts
from mosmedai_load import scenarios


def parse(body: bytes, content_type: str) -> list[pydicom.Dataset]:
    assert content_type.startswith("multipart/related") and 'type="application/dicom"' in content_type
    parts = multipart_parts(body, content_type)
    assert all(kind == "application/dicom" for kind, _ in parts)
    return [pydicom.dcmread(io.BytesIO(payload)) for _, payload in parts]


def test_mammography_study_is_four_views_of_one_study():
    datasets = parse(*scenarios.mammography_study(seed=11, shape=(512, 416)))
    assert len(datasets) == 4 and {ds.Modality for ds in datasets} == {"MG"}
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 4
    assert sorted((ds.ImageLaterality, ds.ViewPosition) for ds in datasets) == [
        ("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
    assert datasets[0].pixel_array.shape == (512, 416)
    assert scenarios.mammography_study(seed=11, shape=(512, 416)) is scenarios.mammography_study(seed=11, shape=(512, 416))


def test_ct_study_is_one_series_of_slices():
    datasets = parse(*scenarios.ct_study(seed=3, shape=(12, 128, 128), spacing_mm=(2.5, 2.8, 2.8), chunk=5))
    assert len(datasets) == 12 and {ds.Modality for ds in datasets} == {"CT"}
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1 and len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, 13))
    assert datasets[0].pixel_array.shape == (128, 128)


def test_paths_weights_follow_the_modality_mix():
    paths = scenarios.resolve(["study_cxr", "study_mg", "study_ct"])
    weights, dropped = scenarios.day_weights(paths)
    # chest X-ray 30 % + fluorography 35 % -> study_cxr; mammography 15 %; chest CT 12 %
    assert weights == pytest.approx([0.65 / 0.92, 0.15 / 0.92, 0.12 / 0.92])
    assert dropped == ["brain_ct", "spine_xray"]
    weights, _ = scenarios.day_weights(scenarios.resolve(["study_cxr", "stow_cxr", "study_ct"]), fixed={"study_ct": 0.1})
    assert weights[2] == pytest.approx(0.1) and weights[0] > weights[1] > 0
    with pytest.raises(scenarios.PathUnavailable, match="shares given for paths not chosen"):
        scenarios.day_weights(paths, fixed={"stow_cxr": 0.1})
    # a sender is built once per process (the bodies are cached)
    assert scenarios.sender(scenarios.PATHS["study_cxr"]) is scenarios.sender(scenarios.PATHS["study_cxr"])
