"""Head CT family: phantoms, postprocess geometry, held-out evaluation and DICOM cases (no Triton)."""

import io
import json
import math

import numpy as np
import pydicom
import pytest

from mosmedai.config import REPO_ROOT
from mosmedai.phantoms.dicom_build import to_bytes
from mosmedai.pipeline.dicom_input import header_facts
from mosmedai.catalog.families import ct_brain as family
from mosmedai.catalog.tools import accepts
from mosmedai.phantoms import TEST_SEED
from mosmedai.phantoms import ct_brain as ctb
from mosmedai_training import ct_brain as ctb_training
from mosmedai.catalog.volumes import VolumeGeometry, to_grid

REPOSITORY = REPO_ROOT / "model_repository"
SPECS = {spec.name: spec for spec in family.TOOLS}


def _find(predicate, start=0, limit=80):
    for i in range(start, start + limit):
        anatomy = ctb.make_anatomy((TEST_SEED, i))
        if predicate(anatomy):
            return i, anatomy
    raise AssertionError("no phantom matches")


def test_phantoms_are_deterministic():
    a, b = ctb.make_anatomy((TEST_SEED, 3)), ctb.make_anatomy((TEST_SEED, 3))
    assert a == b
    slices = np.array([a.n_slices // 2])
    hu_a, _ = ctb.render(a, 96, slices, seed=(TEST_SEED, 3))
    hu_b, _ = ctb.render(b, 96, slices, seed=(TEST_SEED, 3))
    assert np.array_equal(hu_a, hu_b)
    assert 20 <= a.n_slices <= 60 and 2.5 <= a.dz <= 5.0


def test_grid_sample_equals_to_grid_of_the_whole_series():
    anatomy = ctb.make_anatomy((TEST_SEED, 5))
    full, _ = ctb.render(anatomy, 128, noise=False)
    px = anatomy.fov / 128
    expected, geometry = to_grid(full, (anatomy.dz, px, px), ctb_training.GRID)
    zi, ri = ctb_training._grid_indices(anatomy, 128)
    picked, _ = ctb.render(anatomy, 128, zi, noise=False)
    assert np.array_equal(np.rint(picked[:, ri][:, :, ri]).astype(np.int16), expected)
    assert ctb_training.geometry_of(anatomy, 128) == geometry


def test_haemorrhage_is_blood_where_the_truth_says():
    i, anatomy = _find(lambda a: a.haemorrhage is not None and a.haemorrhage["kind"] == "iph")
    hu, masks = ctb.render(anatomy, 128, seed=(TEST_SEED, i))
    blood = masks["haemorrhage"]
    assert blood.sum() > 20
    inner = blood & np.roll(blood, 2, 2) & np.roll(blood, -2, 2)  # away from the blurred edge
    assert abs(hu[inner].mean() - anatomy.haemorrhage["hu"]) < 3.0
    truth = ctb_training.truth_of(anatomy, masks, np.arange(anatomy.n_slices), 128)
    assert truth.haemorrhage and truth.side == anatomy.haemorrhage["side"]
    # side convention: columns increase towards the patient's left
    cols = np.nonzero(blood)[2]
    midline_col = (anatomy.midline + anatomy.fov / 2) / (anatomy.fov / 128)
    assert (cols.mean() > midline_col) == (truth.side == "left")
    first, last = truth.haem_slices
    assert blood[first].any() and blood[last].any() and not blood[:first].any()


def test_ischaemia_is_hypodense_against_the_other_side():
    i, anatomy = _find(lambda a: a.ischaemia is not None and a.ischaemia["territory"] == "MCA"
                       and a.haemorrhage is None and a.tumour is None)
    hu, masks = ctb.render(anatomy, 128, noise=False)
    region = masks["ischaemia"]
    assert region.sum() > 50
    midline_col = (anatomy.midline + anatomy.fov / 2) / (anatomy.fov / 128)
    z, r, c = np.nonzero(region)
    mirror = np.clip(np.rint(2 * midline_col - c - 1).astype(int), 0, 127)
    own, other = hu[z, r, c], hu[z, r, mirror]
    keep = (own > 10) & (other > 10) & (own < 60) & (other < 60)
    drop = other[keep].mean() - own[keep].mean()
    assert anatomy.ischaemia["drop"] - 1 < drop < anatomy.ischaemia["drop"] + 12  # plus lost grey-white contrast


def test_septum_and_midline_targets_match_the_shift():
    i, anatomy = _find(lambda a: abs(a.shift) > 6)
    _, masks = ctb.render(anatomy, 144, noise=False)
    px = anatomy.fov / 144
    septum_cols = np.nonzero(masks["septum"])[2]
    midline_cols = np.nonzero(masks["midline"])[2]
    measured = (septum_cols.mean() - midline_cols.mean()) * px
    assert measured == pytest.approx(anatomy.shift, abs=1.0)
    shift_cells = ctb_training.septum_col(anatomy) - ctb_training.midline_col(anatomy)
    assert shift_cells * anatomy.fov / ctb_training.HEAT[2] == pytest.approx(anatomy.shift)


def _geometry(source=(40, 256, 256), spacing=(3.0, 0.8, 0.8)) -> VolumeGeometry:
    return VolumeGeometry(*source, *spacing, *ctb_training.GRID)


def _skull(geometry: VolumeGeometry, centre_col: float = 48.0) -> np.ndarray:
    d, h, w = ctb_training.GRID
    y, x = np.mgrid[0:h, 0:w] + 0.5
    rho = np.hypot((x - centre_col) / 34, (y - 48) / 42)
    plane = np.where(rho < 0.92, 30, np.where(rho < 1.0, 1000, -1000)).astype(np.int16)
    return np.repeat(plane[None], d, 0)


def test_detection_postprocess_maps_a_peak_to_source_box_slice_and_side():
    geometry = _geometry()
    volume = _skull(geometry)
    heat = np.full(ctb_training.HEAT, -8.0, np.float32)
    heat[10, 20:22, 30:32] = 6.0  # cells: grid rows 40-44, cols 60-64 (patient left of column 48)
    volume[10, 40:44, 60:64] = 70
    spec = SPECS["ctb_hemorrhage"]
    calibration = {"a": 1.0, "b": 0.0}
    out = family.postprocess(spec, {"logit": np.array([3.0], np.float32), "heatmap": heat[None]},
                             geometry.as_vector(), volume, calibration, 0.5)
    assert out.positive and out.probability == pytest.approx(1 / (1 + math.exp(-3)), abs=1e-6)
    scale = 256 / 96
    assert np.allclose(out.location, [40 * scale, 60 * scale, 44 * scale, 64 * scale], atol=1e-3)
    assert out.measurements[0] == geometry.source_slice_of(10)
    assert family.SIDES[int(out.measurements[1])] == "left"
    assert out.measurements[2] == pytest.approx(16 * geometry.grid_voxel_ml, rel=1e-5)
    # the mirror image is the patient's right; a peak at the skull's axis is midline
    mirrored = family.postprocess(spec, {"logit": np.array([3.0], np.float32), "heatmap": heat[None, :, :, ::-1].copy()},
                                  geometry.as_vector(), volume, calibration, 0.5)
    assert family.SIDES[int(mirrored.measurements[1])] == "right"
    central = np.full(ctb_training.HEAT, -8.0, np.float32)
    central[10, 20, 23:25] = 6.0
    middle = family.postprocess(spec, {"logit": np.array([3.0], np.float32), "heatmap": central[None]},
                                geometry.as_vector(), volume, calibration, 0.5)
    assert family.SIDES[int(middle.measurements[1])] == "midline"
    negative = family.postprocess(spec, {"logit": np.array([-3.0], np.float32), "heatmap": heat[None]},
                                  geometry.as_vector(), volume, calibration, 0.5)
    assert not negative.positive and np.all(negative.location == -1) and np.all(np.isnan(negative.measurements))


def test_midline_shift_postprocess_gives_mm_from_column_spacing():
    geometry = _geometry(spacing=(3.0, 0.9, 0.9))
    septum = np.full(ctb_training.HEAT, -20.0, np.float32)
    midline = np.full(ctb_training.HEAT, -20.0, np.float32)
    septum[12, 20:24, 27] = 10.0  # cell column 27 -> grid column 55 (centre), 3 cells right of the midline
    midline[:, 10:40, 24] = 10.0
    out = family.postprocess(SPECS["ctb_midline_shift"], {"septum": septum[None], "midline": midline[None]},
                             geometry.as_vector(), None, {"scale": 1.0}, 0.5)
    col_mm = geometry.grid_spacing_mm[2]  # 256 * 0.9 / 96 = 2.4 mm
    assert out.measurements[0] == pytest.approx(3 * 2 * col_mm, abs=1e-3)
    assert family.DIRECTIONS[int(out.measurements[1])] == "left"
    assert out.measurements[2] == geometry.source_slice_of(12)
    assert out.positive and math.isnan(out.probability)
    assert out.location[1] < out.location[3]
    small = family.postprocess(SPECS["ctb_midline_shift"], {"septum": septum[None], "midline": midline[None]},
                               geometry.as_vector(), None, {"scale": 0.25}, 0.5)
    assert not small.positive


@pytest.mark.parametrize("tool", ctb_training.TOOLS)
def test_evaluate_with_committed_models_matches_the_card(tool):
    card = json.loads((REPOSITORY / tool / "evaluation.json").read_text())
    result = ctb_training.evaluate(tool, REPOSITORY, n=24, seed=TEST_SEED)
    assert result["n"] == 24
    for metric in ("auc", "sensitivity", "specificity", "mae_mm"):
        if metric in card and card[metric] is not None and result.get(metric) is not None:
            assert abs(result[metric] - card[metric]) <= ctb_training.TOLERANCE[metric] + 0.1, \
                (metric, result[metric], card[metric])


def test_cases_are_valid_dicom_series_that_the_tools_accept():
    (case,) = ctb_training.cases("ctb_hemorrhage", seed=TEST_SEED, n=1)
    assert 20 <= len(case.instances) <= 60
    positions = []
    for instance in case.instances:
        dataset = pydicom.dcmread(io.BytesIO(to_bytes(instance)))
        assert dataset.Rows == dataset.Columns == 256
        assert [float(v) for v in dataset.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        positions.append(float(dataset.ImagePositionPatient[2]))
        facts = header_facts(dataset)
        assert all(accepts(spec, facts) for spec in family.TOOLS)
    assert np.all(np.diff(positions) > 0)
    dataset = pydicom.dcmread(io.BytesIO(to_bytes(case.instances[len(case.instances) // 2])))
    hu = dataset.pixel_array.astype(np.float32) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    assert hu.min() >= -1024 and hu.max() > 500  # air and skull
    for key in ("haemorrhage", "ischaemia", "shift_mm", "haem_slices", "side"):
        assert key in case.truth
    # a Russian description alone routes too; a chest CT does not
    empty = pydicom.Dataset()
    empty.Modality, empty.SeriesDescription = "CT", "КТ ГОЛОВНОГО МОЗГА"
    assert all(accepts(spec, header_facts(empty)) for spec in family.TOOLS)
    empty.SeriesDescription, empty.BodyPartExamined = "CHEST", "CHEST"
    assert not any(accepts(spec, header_facts(empty)) for spec in family.TOOLS)
