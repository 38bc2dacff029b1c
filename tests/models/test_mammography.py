"""Mammography family: phantoms, postprocess, evaluation against the cards, DICOM cases (no Triton)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mosmedai.phantoms.dicom_build import to_bytes
from mosmedai.pipeline.dicom_input import decode, header_facts
from mosmedai.catalog.families import IMAGE, ToolOutput
from mosmedai.catalog.families import mammography as family
from mosmedai.catalog.imaging import fit_geometry, to_display
from mosmedai.catalog.tools import HeaderFacts, accepts
from mosmedai.phantoms import TEST_SEED
from mosmedai.phantoms import mammography as mg
from mosmedai_training import mammography as mg_training

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
SPEC = {spec.name: spec for spec in family.TOOLS}


def test_family_contract():
    assert family.FAMILY.kind == IMAGE and family.FAMILY.preprocess == "xr_preprocess"
    assert [s.name for s in family.TOOLS] == ["mg_mass", "mg_calcification", "mg_density"]
    density = SPEC["mg_density"]
    assert not density.has_probability
    assert [m.name for m in density.measurements] == ["density_category"]
    assert density.measurements[0].labels == ("A", "B", "C", "D") and density.measurements[0].unit == "{category}"
    for spec in family.TOOLS:
        assert spec.modalities == frozenset({"MG"}) and spec.views == frozenset({"CC", "MLO"})
        assert 0.0 < spec.default_threshold <= 1.0


def test_phantom_is_deterministic_and_findings_are_where_the_truth_says():
    a = mg.make_phantom((7, 3), findings=["mg_mass", "mg_calcification"], laterality="L", view="MLO")
    b = mg.make_phantom((7, 3), findings=["mg_mass", "mg_calcification"], laterality="L", view="MLO")
    assert np.array_equal(a.stored, b.stored) and a.boxes == b.boxes and a.category == b.category
    plain = mg.make_phantom((7, 3), findings=[], laterality="L", view="MLO")
    assert plain.labels == {"mg_mass": False, "mg_calcification": False} and plain.boxes["mg_mass"] is None
    # Same anatomy: the displayed difference is the drawn findings, inside their boxes.
    difference = to_display(a.stored, a.params) - to_display(plain.stored, plain.params)
    for tool in ("mg_mass", "mg_calcification"):
        r0, c0, r1, c1 = a.boxes[tool]
        assert 0 <= r0 < r1 <= a.shape[0] and 0 <= c0 < c1 <= a.shape[1]
        assert a.masks[tool][r0:r1, c0:c1].any()
        assert difference[r0:r1, c0:c1].max() > 0.1, tool  # brighter where the finding is
    outside = np.ones(a.shape, bool)
    for tool in ("mg_mass", "mg_calcification"):
        r0, c0, r1, c1 = a.boxes[tool]
        outside[max(0, r0 - 40):r1 + 40, max(0, c0 - 40):c1 + 40] = False  # spicules reach beyond the core
    assert np.percentile(np.abs(difference[outside]), 99) < 0.08
    # Left breast: chest wall (tissue) on the image's left; right breast mirrored.
    right = mg.make_phantom((7, 3), findings=["mg_mass"], laterality="R", view="MLO")
    left_cols = a.stored[:, :10].mean(), a.stored[:, -10:].mean()
    right_cols = right.stored[:, :10].mean(), right.stored[:, -10:].mean()
    if not a.params.invert:
        assert left_cols[0] > left_cols[1]
    if not right.params.invert:
        assert right_cols[1] > right_cols[0]
    r0, c0, r1, c1 = right.boxes["mg_mass"]
    assert right.masks["mg_mass"][r0:r1, c0:c1].any()


def test_density_category_follows_the_fibroglandular_share():
    for category in range(4):
        phantom = mg.make_phantom((11, category), category=category, findings=[])
        assert phantom.category == category
        assert mg.density_category_of(phantom.dense_fraction) == category
    assert [mg.density_category_of(f) for f in (0.1, 0.3, 0.6, 0.8)] == [0, 1, 2, 3]


def test_detection_postprocess_maps_the_heatmap_peak_to_source_pixels():
    rows, cols = 1000, 800
    geometry, _, _ = fit_geometry(rows, cols)
    heatmap = np.full((1, 32, 32), -8.0, np.float32)
    heatmap[0, 10, 20] = 6.0  # network pixels rows 80-88, columns 160-168
    calibration = {"a": 1.0, "b": 0.0}
    out = family.postprocess(SPEC["mg_mass"], {"logit": np.array([3.0], np.float32), "heatmap": heatmap},
                             geometry.as_vector(), None, calibration, 0.5)
    assert isinstance(out, ToolOutput) and out.positive and math.isclose(out.probability, 1 / (1 + math.exp(-3)), rel_tol=1e-5)
    centre_r, centre_c = (out.location[0] + out.location[2]) / 2, (out.location[1] + out.location[3]) / 2
    expected_r, expected_c = geometry.to_source(84.0, 164.0)
    assert abs(centre_r - expected_r) < 1.0 and abs(centre_c - expected_c) < 1.0
    negative = family.postprocess(SPEC["mg_calcification"], {"logit": np.array([-3.0], np.float32), "heatmap": heatmap},
                                  geometry.as_vector(), None, calibration, 0.5)
    assert not negative.positive and np.all(negative.location == -1)


def test_density_postprocess_reports_the_category_and_dense_rule():
    geometry = fit_geometry(1000, 800)[0].as_vector()
    for category in range(4):
        logits = np.full(4, -1.0, np.float32)
        logits[category] = 2.0
        out = family.postprocess(SPEC["mg_density"], {"density_logits": logits}, geometry, None, {}, 0.5)
        assert math.isnan(out.probability) and out.measurements.tolist() == [category]
        assert out.positive == (category >= 2) and np.all(out.location == -1)


def test_metrics_helpers():
    assert mg_training.weighted_kappa([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert mg_training.weighted_kappa([0, 1, 2, 3, 0, 3], [3, 2, 1, 0, 3, 0]) < 0
    assert mg_training.confusion([0, 1, 1], [0, 1, 2]).tolist()[1] == [0, 1, 1, 0]
    truth = np.array([100, 100, 120, 120], np.float32)
    assert mg_training.location_hit(np.array([95, 95, 125, 125]), truth, 0.25)
    # centre 15 px = 3.75 mm off: within 4 mm
    assert mg_training.location_hit(np.array([120, 120, 130, 130]), truth, 0.25)
    assert not mg_training.location_hit(np.array([200, 200, 210, 210]), truth, 0.25)


@pytest.mark.parametrize("tool", mg_training.TOOLS)
def test_cases_are_valid_dicom_the_routing_accepts(tool):
    cases = mg_training.cases(tool, TEST_SEED, 4)
    assert [(c.truth["laterality"], c.truth["view"]) for c in cases] == [("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")]
    for case in cases:
        (dataset,) = case.instances
        body = to_bytes(dataset)
        again = pydicom.dcmread(io.BytesIO(body))
        assert again.SOPClassUID == mg.MG_FOR_PRESENTATION and again.Modality == "MG"
        assert max(again.Rows, again.Columns) <= 1024
        decoded = decode(body, 50_000_000)
        assert decoded is not None
        facts = header_facts(again)
        assert accepts(SPEC[tool], facts)
        if case.truth["box"] is not None:
            r0, c0, r1, c1 = case.truth["box"]
            assert 0 <= r0 < r1 <= again.Rows and 0 <= c0 < c1 <= again.Columns
    assert any(c.truth["label"] for c in cases) and not all(c.truth["label"] for c in cases)


def test_routing():
    for spec in family.TOOLS:
        assert accepts(spec, HeaderFacts(modality="MG", view_position="MLO"))
        assert accepts(spec, HeaderFacts(modality="MG", series_description="МАММОГРАФИЯ"))
        assert not accepts(spec, HeaderFacts(modality="DX", view_position="CC"))
        assert not accepts(spec, HeaderFacts(modality="MG", view_position="XCCL", series_description="BREAST"))


def _served(tool: str, cases):
    """The family postprocess on ONNX outputs of the cases' images (the serving path, minus Triton)."""
    from mosmedai.pipeline.dicom_input import decode
    from mosmedai.catalog.imaging import preprocess, reduce_for_transport

    spec = SPEC[tool]
    calibration = json.loads((REPOSITORY / f"{tool}_post" / "1" / "calibration.json").read_text())
    outputs = []
    for case in cases:
        decoded = decode(to_bytes(case.instances[0]), 50_000_000)
        reduced, fr, fc = reduce_for_transport(decoded.stored)
        image, geometry = preprocess(reduced, decoded.params)
        raw = mg_training.onnx_run(REPOSITORY / f"{tool}_net" / "1" / "model.onnx", image[None, None])
        out = family.postprocess(spec, {k: v[0] for k, v in raw.items()}, geometry.as_vector(), None, calibration,
                                 spec.default_threshold)
        if out.location[0] >= 0:
            out.location = out.location * np.array([fr, fc, fr, fc], np.float32)
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("tool", mg_training.TOOLS)
def test_committed_models_match_their_cards(tool):
    card = REPOSITORY / tool / "evaluation.json"
    if not (REPOSITORY / f"{tool}_net" / "1" / "model.onnx").exists() or not card.exists():
        pytest.skip("model not trained yet")
    expected = json.loads(card.read_text())
    result = mg_training.evaluate(tool, REPOSITORY, n=48)
    for metric in mg_training.HEADLINE[tool]:
        if expected.get(metric) is None or result.get(metric) is None:
            continue
        assert abs(result[metric] - expected[metric]) <= mg_training.TOLERANCE[metric], \
            (metric, result[metric], expected[metric])
    cases = mg_training.cases(tool, TEST_SEED, 12)
    served = mg_training.score(tool, _served(tool, cases), cases)
    for metric in mg_training.HEADLINE[tool]:
        if expected.get(metric) is None or served.get(metric) is None:
            continue
        assert abs(served[metric] - expected[metric]) <= mg_training.TOLERANCE[metric] + 0.1, \
            (metric, served[metric], expected[metric])
