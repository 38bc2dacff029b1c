"""Spine X-ray family: phantoms, Cobb postprocess, held-out evaluation and DICOM cases (no Triton)."""

import io
import json
import math

import numpy as np
import pydicom
import pytest

from mosmedai.config import REPO_ROOT
from mosmedai.phantoms.dicom_build import to_bytes
from mosmedai.pipeline.dicom_input import decode, header_facts
from mosmedai.catalog.families import spine_xray as family
from mosmedai.catalog.families.chest_xray import TOOLS as CXR_TOOLS
from mosmedai.catalog.imaging import fit_geometry
from mosmedai.catalog.tools import accepts
from mosmedai.phantoms import TEST_SEED
from mosmedai.phantoms import spine_xray as spine
from mosmedai_training import spine_xray as spine_training

REPOSITORY = REPO_ROOT / "model_repository"
SPEC = family.TOOLS[0]
SMALL = (300, 320)


def test_phantoms_are_deterministic():
    a = spine.make_phantom((TEST_SEED, 1), rows_range=SMALL)
    b = spine.make_phantom((TEST_SEED, 1), rows_range=SMALL)
    assert np.array_equal(a.stored, b.stored) and np.array_equal(a.tilts_deg, b.tilts_deg)


def test_truth_cobb_is_the_largest_angle_between_end_plates():
    for index in range(5):
        phantom = spine.make_phantom((TEST_SEED, 10 + index), rows_range=SMALL)
        # End plate direction from the drawn corners (row, column): upper-left -> upper-right.
        vectors = phantom.corners[:, 1] - phantom.corners[:, 0]
        drawn = np.degrees(np.arctan2(-vectors[:, 0], vectors[:, 1]))
        assert np.allclose(drawn, phantom.tilts_deg, atol=1e-6)
        pairs = np.abs(drawn[:, None] - drawn[None, :])
        assert phantom.cobb_deg == pytest.approx(pairs.max())
        assert phantom.grade == family.grade_of(phantom.cobb_deg)


def test_forced_cobb_angle_and_vertebrae_where_the_truth_says():
    phantom = spine.make_phantom((TEST_SEED, 30), rows_range=SMALL, cobb=40.0)
    assert 36.0 < phantom.cobb_deg < 44.0  # target +- the per-vertebra irregularity
    label = phantom._label
    for i, (r, c) in enumerate(phantom.centres):
        assert label[int(r), int(c)] == i + 1
    r0, c0, r1, c1 = phantom.box
    first, last = phantom.end_vertebrae
    assert r0 <= phantom.centres[first, 0] <= r1 and r0 <= phantom.centres[last, 0] <= r1


def test_map_targets_carry_the_vertebral_tilts():
    phantom = spine.make_phantom((TEST_SEED, 31), rows_range=SMALL, cobb=50.0)
    image, geometry = spine.network_input(phantom)
    cover, tilt = spine_training.map_targets(phantom, geometry)
    degrees = tilt[cover > 0.5] * family.TILT_SCALE_DEG
    assert degrees.max() <= phantom.tilts_deg.max() + 1e-3 and degrees.min() >= phantom.tilts_deg.min() - 1e-3
    assert degrees.max() - degrees.min() > 0.7 * phantom.cobb_deg


@pytest.mark.parametrize("cobb, grade", [(0.5, 0), (1.0, 1), (10.0, 1), (10.01, 2), (25.0, 2), (25.5, 3),
                                         (50.0, 3), (50.1, 4), (float("nan"), 0)])
def test_chaklin_grade_cut_points(cobb, grade):
    assert family.grade_of(cobb) == grade


def test_postprocess_measures_the_tilt_profile():
    geometry, _, _ = fit_geometry(1000, 450)
    spine_map = np.full((1, 32, 32), -8.0, np.float32)
    tilt = np.zeros((1, 32, 32), np.float32)
    rows = np.arange(4, 28)
    spine_map[0, rows, 15:17] = 8.0
    degrees = np.linspace(20.0, -20.0, rows.size)  # +20 at the top, -20 at the bottom
    tilt[0, rows, 15:17] = (degrees / family.TILT_SCALE_DEG)[:, None]
    out = family.postprocess(SPEC, {"spine": spine_map, "tilt": tilt}, geometry.as_vector(), None,
                             {"a": 1.0, "b": 0.0}, SPEC.default_threshold)
    step = 40.0 / (rows.size - 1)
    assert out.measurements[0] == pytest.approx(40.0 - 0.5 * step, abs=1e-3)  # the ends are smoothed by 1/4 step
    assert family.GRADES[int(out.measurements[1])] == "III" and out.positive and math.isnan(out.probability)
    assert out.location[0] == pytest.approx((4 * 8 - geometry.pad_top) / geometry.scale, abs=0.5)
    assert out.location[2] == pytest.approx((28 * 8 - geometry.pad_top) / geometry.scale, abs=0.5)
    centre_c = (out.location[1] + out.location[3]) / 2
    assert centre_c == pytest.approx((16 * 8 - geometry.pad_left) / geometry.scale, abs=1.0)
    # Calibration applies; a straight spine is not positive and has no location.
    straight = family.postprocess(SPEC, {"spine": spine_map, "tilt": np.zeros_like(tilt)}, geometry.as_vector(),
                                  None, {"a": 1.0, "b": 2.0}, SPEC.default_threshold)
    assert straight.measurements[0] == pytest.approx(2.0) and not straight.positive
    assert np.all(straight.location == -1)
    nothing = family.postprocess(SPEC, {"spine": np.full((1, 32, 32), -8.0, np.float32), "tilt": tilt},
                                 geometry.as_vector(), None, {"a": 1.0, "b": 0.0}, SPEC.default_threshold)
    assert not nothing.positive and np.isnan(nothing.measurements).all()


def test_evaluate_agrees_with_the_card():
    card = json.loads((REPOSITORY / "spine_scoliosis" / "evaluation.json").read_text())
    result = spine_training.evaluate("spine_scoliosis", REPOSITORY, n=20, seed=TEST_SEED)
    assert result["model_sha256"] == card["model_sha256"]
    for metric, tolerance in spine_training.TOLERANCE.items():
        if result.get(metric) is None or card.get(metric) is None:
            continue
        assert abs(result[metric] - card[metric]) <= tolerance, (metric, result[metric], card[metric])


def test_cases_are_valid_dicom_routed_to_the_tool():
    from mosmedai.catalog.families import fluorography

    for case in spine_training.cases("spine_scoliosis", TEST_SEED, 3):
        (dataset,) = case.instances
        body = to_bytes(dataset)
        again = pydicom.dcmread(io.BytesIO(body))
        assert max(again.Rows, again.Columns) <= 1024 and again.BodyPartExamined
        decoded = decode(body, max_pixels=64 * 1024 * 1024)
        assert decoded.stored.shape == (again.Rows, again.Columns)
        facts = header_facts(again)
        assert accepts(SPEC, facts)
        assert not any(accepts(spec, facts) for spec in (*CXR_TOOLS, *fluorography.TOOLS))
        assert case.truth["positive"] == (case.truth["cobb_deg"] >= 10.0)


def test_routing_by_description_without_body_part():
    phantom = spine.make_phantom((TEST_SEED, 2), rows_range=SMALL)
    facts = header_facts(spine.to_dataset(phantom, body_part="", description="Сколиоз AP"))
    assert accepts(SPEC, facts)
    chest = header_facts(spine.to_dataset(phantom, body_part="CHEST", description="Chest PA"))
    assert not accepts(SPEC, chest)
