"""Fluorography family: phantoms, postprocess, held-out evaluation and DICOM cases (no Triton)."""

import io
import json
import math

import numpy as np
import pydicom
import pytest

from mosmedai.phantoms.dicom_build import to_bytes
from mosmedai.pipeline.dicom_input import decode, header_facts
from mosmedai.catalog.families import fluorography as family
from mosmedai.catalog.families.chest_xray import TOOLS as CXR_TOOLS
from mosmedai.catalog.imaging import VoiFunction, fit_geometry
from mosmedai.catalog.tools import accepts
from mosmedai.phantoms import TEST_SEED
from mosmedai.phantoms import fluorography as flg
from mosmedai_training import fluorography as flg_training

from mosmedai.config import REPO_ROOT

REPOSITORY = REPO_ROOT / "model_repository"
SPECS = {spec.name: spec for spec in family.TOOLS}
SMALL = (300, 340)


def test_phantoms_are_deterministic():
    a = flg.make_phantom((TEST_SEED, 3), long_side=SMALL)
    b = flg.make_phantom((TEST_SEED, 3), long_side=SMALL)
    assert np.array_equal(a.stored, b.stored) and a.labels == b.labels and a.boxes == b.boxes
    c = flg.make_phantom((TEST_SEED, 4), long_side=SMALL)
    assert not np.array_equal(a.stored[:50, :50], c.stored[:50, :50]) or a.shape != c.shape


def test_served_size_and_bit_depth():
    phantom = flg.make_phantom((TEST_SEED, 0), bits_stored=8)
    assert 700 <= max(phantom.shape) <= 1200 and phantom.stored.dtype == np.uint8
    assert phantom.stored.max() <= 255


@pytest.mark.parametrize("finding", ["nodule", "fibrosis"])
def test_finding_is_drawn_where_the_truth_says(finding):
    """Same seed with and without the finding: the stored images differ only around its box
    (findings have their own random streams, the anatomy and noise are identical)."""
    for index in range(6):
        seed = (TEST_SEED, 100 + index)
        kwargs = dict(long_side=SMALL, bits_stored=12, monochrome1=False, voi=VoiFunction.AUTO)
        with_finding = flg.make_phantom(seed, findings=(finding,), **kwargs)
        if with_finding.boxes[finding] is None:
            continue
        without = flg.make_phantom(seed, findings=(), **kwargs)
        assert with_finding.labels[finding] and with_finding.labels["abnormal"] and not without.labels["abnormal"]
        diff = np.abs(with_finding.stored.astype(int) - without.stored.astype(int)) > 40
        r0, c0, r1, c1 = with_finding.boxes[finding]
        margin = 12
        outside = diff.copy()
        outside[max(0, r0 - margin):r1 + margin, max(0, c0 - margin):c1 + margin] = False
        assert diff[r0:r1, c0:c1].sum() > 0
        assert outside.sum() <= 0.02 * diff.sum() + 2
        if finding == "fibrosis":  # an upper zone: the box's centre in the top half of the image
            assert (r0 + r1) / 2 < with_finding.shape[0] * 0.55
        return
    pytest.fail("no phantom drew the finding")


def test_triage_label_is_any_finding():
    for index in range(12):
        phantom = flg.make_phantom((TEST_SEED, 200 + index), long_side=SMALL)
        assert phantom.label("flg_triage") == any(phantom.labels[f] for f in flg.FINDINGS)
        assert phantom.label("flg_nodule") == phantom.labels["nodule"]


def test_postprocess_maps_the_heatmap_peak_to_source_pixels():
    geometry, _, _ = fit_geometry(1000, 800)  # scale 0.256, columns padded
    heatmap = np.full((1, 32, 32), -8.0, np.float32)
    heatmap[0, 10, 20] = 6.0
    spec = SPECS["flg_nodule"]
    out = family.postprocess(spec, {"logit": np.array([5.0], np.float32), "heatmap": heatmap},
                             geometry.as_vector(), None, {"a": 1.0, "b": 0.0}, spec.default_threshold)
    assert out.positive and out.probability == pytest.approx(1 / (1 + math.exp(-5.0)), rel=1e-5)
    centre_r = (out.location[0] + out.location[2]) / 2
    centre_c = (out.location[1] + out.location[3]) / 2
    assert centre_r == pytest.approx((10.5 * 8 - geometry.pad_top) / geometry.scale, abs=1.0)
    assert centre_c == pytest.approx((20.5 * 8 - geometry.pad_left) / geometry.scale, abs=1.0)
    assert out.location[2] - out.location[0] == pytest.approx(8 / geometry.scale, abs=1.0)
    negative = family.postprocess(spec, {"logit": np.array([-5.0], np.float32), "heatmap": heatmap},
                                  geometry.as_vector(), None, {"a": 1.0, "b": 0.0}, spec.default_threshold)
    assert not negative.positive and np.all(negative.location == -1)


@pytest.mark.parametrize("tool", flg.TOOLS)
def test_evaluate_agrees_with_the_card(tool):
    card = json.loads((REPOSITORY / tool / "evaluation.json").read_text())
    result = flg_training.evaluate(tool, REPOSITORY, n=20, seed=TEST_SEED)
    assert result["model_sha256"] == card["model_sha256"]
    for metric, tolerance in flg_training.TOLERANCE.items():
        if result.get(metric) is None or card.get(metric) is None or math.isnan(result[metric]):
            continue
        assert abs(result[metric] - card[metric]) <= tolerance, (metric, result[metric], card[metric])


@pytest.mark.parametrize("tool", flg.TOOLS)
def test_cases_are_valid_dicom_routed_to_the_tool(tool):
    cases = flg_training.cases(tool, TEST_SEED, 4)
    for case in cases:
        (dataset,) = case.instances
        body = to_bytes(dataset)
        again = pydicom.dcmread(io.BytesIO(body))
        assert again.Modality == "DX" and max(again.Rows, again.Columns) <= 1200
        decoded = decode(body, max_pixels=64 * 1024 * 1024)
        assert decoded.stored.shape == (again.Rows, again.Columns)
        facts = header_facts(again)
        assert all(accepts(spec, facts) for spec in family.TOOLS)
        assert not any(accepts(spec, facts) for spec in CXR_TOOLS)  # chest X-ray tools exclude fluorography
        assert isinstance(case.truth["label"], bool)
        if case.truth["label"]:
            r0, c0, r1, c1 = case.truth["box"]
            assert 0 <= r0 < r1 <= again.Rows and 0 <= c0 < c1 <= again.Columns


def test_a_chest_radiograph_without_the_keyword_is_not_fluorography():
    phantom = flg.make_phantom((TEST_SEED, 1), long_side=SMALL)
    facts = header_facts(flg.to_dataset(phantom, "Chest PA"))
    assert not any(accepts(spec, facts) for spec in family.TOOLS)
    assert all(accepts(spec, facts) for spec in CXR_TOOLS)


def test_score_counts_served_outputs():
    cases = flg_training.cases("flg_nodule", TEST_SEED, 3)
    outputs = [family.ToolOutput(0.9 if c.truth["label"] else 0.1, c.truth["label"],
                                 np.array(c.truth["box"] or [-1] * 4, np.float32)) for c in cases]
    result = flg_training.score("flg_nodule", outputs, cases)
    assert result["n"] == 3 and result["specificity"] == 1.0
