"""ct_chest family: phantoms, postprocess units/coordinates, cases and the committed models (no Triton)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mosmedai.phantoms import dicom_build

from mosmedai.catalog import volumes
from mosmedai.pipeline.dicom_input import header_facts
from mosmedai.catalog.families import ct_chest as family
from mosmedai.catalog.families.ct_chest import GRID, HEAD
from mosmedai.catalog.tools import accepts
from mosmedai.phantoms import TEST_SEED
from mosmedai.phantoms import ct_chest as phantoms
from mosmedai_training import ct_chest as training

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
SPECS = {spec.name: spec for spec in family.TOOLS}


def _geometry(source=(60, 200, 200), spacing=(2.5, 0.8, 0.8)) -> volumes.VolumeGeometry:
    return volumes.VolumeGeometry(*source, *spacing, *GRID)


def _heads(**boxes) -> dict[str, np.ndarray]:
    """Head logits [1, *HEAD]: +8 inside the given half-grid boxes, -8 elsewhere."""
    out = {}
    for name, box in boxes.items():
        logits = np.full((1, *HEAD), -8.0, np.float32)
        if box is not None:
            logits[(0, *box)] = 8.0
        out[name] = logits
    return out


# --- phantoms ----------------------------------------------------------------------------


def test_phantom_is_deterministic():
    a = phantoms.make_phantom((TEST_SEED, 1)).grid_sample()
    b = phantoms.make_phantom((TEST_SEED, 1)).grid_sample()
    assert np.array_equal(a[0], b[0])
    for name in a[1]:
        assert np.array_equal(a[1][name], b[1][name])


def test_grid_sample_is_to_grid_of_the_source():
    phantom = phantoms.make_phantom((TEST_SEED, 2), findings={"nodule": True, "cac": True, "covid": True})
    full, masks = phantom.render(noise=False)
    sampled, sampled_masks = phantom.grid_sample(noise=False)
    grid, _ = volumes.to_grid(full, phantom.spacing_mm, GRID)
    assert np.array_equal(np.rint(sampled).astype(np.int16), grid)
    index = np.ix_(*(volumes.sample_indices(s, g) for s, g in zip(phantom.shape, GRID)))
    assert np.array_equal(masks["lung"][index], sampled_masks["lung"])


def test_nodule_is_where_the_truth_says():
    phantom = phantoms.make_phantom((TEST_SEED, 3), findings={"nodule": True})
    hu, masks = phantom.render(noise=False)
    truth = phantom.truth(hu, masks)
    k = truth["nodule_slice"]
    r0, c0, r1, c1 = truth["nodule_box"]
    centre = (k, int((r0 + r1) / 2), int((c0 + c1) / 2))
    assert masks["nodule"][centre]
    assert abs(hu[centre] - phantom.params["nodule_hu"]) < 1e-3
    rows = np.flatnonzero(masks["nodule"][k].any(axis=1))
    cols = np.flatnonzero(masks["nodule"][k].any(axis=0))
    assert r0 - 1 <= rows[0] and rows[-1] + 1 <= r1 + 1 and c0 - 1 <= cols[0] and cols[-1] + 1 <= c1 + 1
    assert 5.0 <= truth["nodule_diameter_mm"] <= 30.0


def test_truth_quantities_are_physical():
    phantom = phantoms.make_phantom((TEST_SEED, 4), findings={"emphysema": True, "covid": False, "cac": False})
    hu, masks = phantom.render()
    truth = phantom.truth(hu, masks)
    share = 100.0 * float((hu[masks["lung"]] < -950).mean())
    assert truth["laa950_percent"] == pytest.approx(share)
    assert truth["laa950_percent"] > 0.5
    assert truth["involvement_percent"] == 0 and truth["ct_category"] == 0
    assert truth["calcium_score"] == 0 and truth["cac_category"] == 0
    # the cancellous bone is drawn at the truth's HU
    core = phantom.anatomy(*phantom._coords(np.arange(phantom.shape[0]), np.arange(phantom.shape[1]),
                                            np.arange(phantom.shape[2]))[:3])["cancellous"]
    assert float(hu[core].mean()) == pytest.approx(truth["vertebral_hu"], abs=3.0)


# --- postprocess -------------------------------------------------------------------------


def test_upsample_matches_linear_interpolation():
    ramp = np.arange(HEAD[2], dtype=np.float32)[None, None, :] * np.ones(HEAD, np.float32)
    up = family.upsample2(ramp)
    assert up.shape == GRID
    # interior: value at full-grid voxel j is ramp at (j + 0.5) / 2 - 0.5
    j = np.arange(2, GRID[2] - 2)
    assert np.allclose(up[0, 0, j], (j + 0.5) / 2 - 0.5)


def test_nodule_postprocess_maps_to_source():
    geometry = _geometry()
    volume = np.full(GRID, -860, np.int16)
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in GRID), indexing="ij")
    dz, dy, dx = geometry.grid_spacing_mm
    centre = (20, 40, 30)  # grid voxel
    radius_mm = 8.0
    sphere = ((zz - centre[0]) * dz) ** 2 + ((yy - centre[1]) * dy) ** 2 + ((xx - centre[2]) * dx) ** 2 <= radius_mm**2
    volume[sphere] = 40
    outputs = _heads(nodule=(slice(8, 13), slice(17, 24), slice(12, 19)))
    outputs["logit"] = np.array([6.0], np.float32)
    result = family.postprocess(SPECS["ctc_nodule"], outputs, geometry.as_vector(), volume, {"a": 1.0, "b": 0.0}, 0.5)
    assert result.positive and result.probability > 0.99
    slice_, diameter = result.measurements
    assert slice_ == geometry.source_slice_of(centre[0])
    assert diameter == pytest.approx(2 * radius_mm, rel=0.12)
    r0, c0, r1, c1 = result.location
    # box centre at the sphere's centre in source pixels (grid voxel k covers source [k, k+1) * scale)
    assert (r0 + r1) / 2 == pytest.approx((centre[1] + 0.5) * 200 / GRID[1], abs=1.5)
    assert (c0 + c1) / 2 == pytest.approx((centre[2] + 0.5) * 200 / GRID[2], abs=1.5)
    assert (r1 - r0) * geometry.row_spacing_mm == pytest.approx(2 * radius_mm, rel=0.2)
    negative = family.postprocess(SPECS["ctc_nodule"], {**outputs, "logit": np.array([-6.0], np.float32)},
                                  geometry.as_vector(), volume, {"a": 1.0, "b": 0.0}, 0.5)
    assert not negative.positive and np.all(negative.location == -1) and negative.measurements[0] == -1


def test_emphysema_and_covid_shares():
    geometry = _geometry()
    volume = np.full(GRID, -860, np.int16)
    lung_half = (slice(4, 20), slice(10, 30), slice(10, 30))
    lung = np.zeros(GRID, bool)
    lung[8:40, 20:60, 20:60] = True  # the same box on the grid
    volume[8:16, 20:60, 20:60] = -975  # 8 of 32 slices
    outputs = _heads(lung=lung_half, lesion=(slice(4, 20), slice(10, 30), slice(10, 15)))
    result = family.postprocess(SPECS["ctc_emphysema"], outputs, geometry.as_vector(), volume, {}, 0.5)
    assert result.measurements[0] == pytest.approx(25.0, abs=0.5) and result.positive
    covid = family.postprocess(SPECS["ctc_covid"], outputs, geometry.as_vector(), volume, {}, 0.5)
    assert covid.measurements[0] == pytest.approx(25.0, abs=1.5)
    assert covid.positive and math.isnan(covid.probability)
    assert [family.covid_category(p) for p in (0.0, 0.4, 10, 25, 49.9, 50, 74, 75, 100)] == [0, 0, 1, 2, 2, 3, 3, 4, 4]


def test_bone_density_erodes_the_cortex():
    geometry = _geometry()
    volume = np.zeros(GRID, np.int16)
    body = np.zeros(GRID, bool)
    body[10:30, 60:80, 38:58] = True
    volume[body] = 700
    core = np.zeros(GRID, bool)
    core[11:29, 62:78, 40:56] = True
    volume[core] = 85
    outputs = _heads(vertebra=(slice(5, 15), slice(30, 40), slice(19, 29)))
    result = family.postprocess(SPECS["ctc_bone_density"], outputs, geometry.as_vector(), volume, {"erode_mm": 3.0}, 0.5)
    assert result.measurements[0] == pytest.approx(85.0) and result.positive


def test_calcium_score_agatston_units():
    geometry = _geometry()
    dz, dy, dx = geometry.grid_spacing_mm
    volume = np.full(GRID, 40, np.int16)
    volume[20, 30:33, 40:42] = 350  # 6 voxels, weight 3, one slice
    outputs = _heads(heart=(slice(8, 14), slice(10, 20), slice(15, 25)), calcium=(slice(10, 11), slice(15, 17), slice(20, 21)))
    result = family.postprocess(SPECS["ctc_cac"], outputs, geometry.as_vector(), volume, {}, 0.5)
    expected = 6 * dy * dx * 3 * dz / 3.0
    assert result.measurements[0] == pytest.approx(expected, rel=1e-4)
    assert result.positive and result.measurements[1] == family.cac_category(expected)
    # a bright component outside the calcium mask is not counted
    volume[30, 30:33, 40:42] = 350
    again = family.postprocess(SPECS["ctc_cac"], outputs, geometry.as_vector(), volume, {}, 0.5)
    assert again.measurements[0] == pytest.approx(expected, rel=1e-4)


# --- cases -------------------------------------------------------------------------------


def test_cases_are_valid_routed_dicom():
    case = training.cases("ctc_nodule", seed=TEST_SEED, n=1)[0]
    assert 40 <= len(case.instances) <= 64
    reread = [pydicom.dcmread(io.BytesIO(dicom_build.to_bytes(d))) for d in case.instances[:3]]
    assert reread[0].Modality == "CT" and reread[0].Rows <= 256
    facts = header_facts(reread[0])
    for spec in family.TOOLS:
        assert accepts(spec, facts), spec.name
    hu, spacing = training.series_volume(case.instances)
    assert hu.shape[0] == len(case.instances)
    assert spacing == pytest.approx(tuple(case.truth["spacing_mm"]), rel=1e-4)
    json.dumps(case.truth)


# --- committed models --------------------------------------------------------------------


@pytest.mark.skipif(not (REPOSITORY / "ctc_covid" / "evaluation.json").exists(), reason="models not trained yet")
@pytest.mark.parametrize("tool", training.TOOLS)
def test_committed_model_agrees_with_its_card(tool):
    card = json.loads((REPOSITORY / tool / "evaluation.json").read_text())
    result = training.evaluate(tool, REPOSITORY, n=12, seed=TEST_SEED)
    for key in training.HEADLINE[tool]:
        if card.get(key) is None or result.get(key) is None:
            continue
        if key in ("sensitivity", "auc") and result["n_positive"] < 3 or key == "specificity" and result["n_negative"] < 3:
            continue
        assert abs(result[key] - card[key]) <= training.TOLERANCE[key] * 1.5, (key, result[key], card[key])
