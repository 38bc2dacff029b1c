"""The reference chest X-ray models work, and their model cards tell the truth.

Each tool is evaluated on fresh phantoms (TEST_SEED: neither training, calibration nor the
cards' held-out split) through ONNX Runtime and `mosmedai.catalog.postprocess`, as served on CPU
(no Triton). The test fails when a model stops detecting its finding, or when the numbers
in `model_repository/<tool>/evaluation.json` no longer describe the model next to them.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mosmedai.phantoms import CALIBRATION_SEED, HELD_OUT_SEED, TEST_SEED, TRAIN_SEED
from mosmedai.phantoms.chest_xray import TOOLS
from mosmedai.serving.model_repo import read_threshold
from mosmedai_training.evaluate import evaluate
from mosmedai_training.metrics import auc_score, auc_standard_error, box_hit, expected_calibration_error

REPOSITORY = Path(__file__).resolve().parents[3] / "model_repository"

#: Images per tool: one set of phantoms serves all three tools (~50 % prevalence each).
N = 120

#: Floors the models must clear on fresh phantoms. The held-out AUCs are 0.98-1.00 (see the
#: cards); at N = 120 (about 60/60) the Hanley-McNeil standard error of such an AUC is <= 0.015,
#: so a working model clears these by several standard errors and a broken one cannot.
MIN_AUC = {"cxr_opacity": 0.93, "cxr_nodule": 0.9, "cxr_pneumothorax": 0.93}
MIN_SENSITIVITY = 0.75
MIN_SPECIFICITY = 0.75
MIN_HIT_RATE = 0.6

#: How far this run may differ from the card (n = 400) and still be sampling noise.
#: The standard error of a difference of two independent estimates is sqrt(se1^2 + se2^2):
#: sensitivity or specificity near 0.9 gives sqrt(0.09/60 + 0.09/200) = 0.044, so 0.12 is about
#: 2.7 standard errors (a false alarm about 1 run in 150 per comparison); an AUC near 0.97
#: gives about 0.02, so 0.05 is 2.5 standard errors. The tolerance widens to 3 computed
#: standard errors where the models' own numbers make them larger.
AUC_TOLERANCE = 0.05
RATE_TOLERANCE = 0.12


def _rate_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.05 * 0.95) / max(n, 1))


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {tool: evaluate(tool, n=N, seed=TEST_SEED, repository=REPOSITORY) for tool in TOOLS}


def _card(tool: str) -> dict:
    return json.loads((REPOSITORY / tool / "evaluation.json").read_text())


def test_seeds_are_disjoint():
    assert len({TRAIN_SEED, CALIBRATION_SEED, HELD_OUT_SEED, TEST_SEED}) == 4
    with pytest.raises(ValueError):
        evaluate("cxr_nodule", n=4, seed=TRAIN_SEED, repository=REPOSITORY)


@pytest.mark.parametrize("tool", TOOLS)
def test_model_detects_its_finding(results, tool):
    result = results[tool]
    assert result["n_positive"] >= 30 and result["n_negative"] >= 30, result
    assert result["auc"] >= MIN_AUC[tool], result
    assert result["sensitivity"] >= MIN_SENSITIVITY, result
    assert result["specificity"] >= MIN_SPECIFICITY, result
    assert result["localisation_hit_rate"] >= MIN_HIT_RATE, result


@pytest.mark.parametrize("tool", TOOLS)
def test_card_describes_this_model(results, tool):
    card, result = _card(tool), results[tool]
    model = REPOSITORY / f"{tool}_net" / "1" / "model.onnx"
    assert card["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest(), (
        "evaluation.json was written for another model.onnx: rerun "
        "`python -m mosmedai_training.evaluate --write-cards`"
    )
    calibration = json.loads((REPOSITORY / f"{tool}_post" / "1" / "calibration.json").read_text())
    assert card["calibration"] == {"a": calibration["a"], "b": calibration["b"]}
    assert card["threshold"] == result["threshold"], (
        f"the card was computed at threshold {card['threshold']}, the config says {result['threshold']}: "
        "rerun `python -m mosmedai_training.evaluate --write-cards`"
    )
    assert card["seed"] == HELD_OUT_SEED and card["n"] >= 400

    auc_tolerance = max(
        AUC_TOLERANCE,
        3 * math.hypot(
            auc_standard_error(card["auc"], card["n_positive"], card["n_negative"]),
            auc_standard_error(result["auc"], result["n_positive"], result["n_negative"]),
        ),
    )
    assert abs(card["auc"] - result["auc"]) <= auc_tolerance, (card["auc"], result["auc"])
    for rate, n_key in (("sensitivity", "n_positive"), ("specificity", "n_negative")):
        tolerance = max(
            RATE_TOLERANCE,
            3 * math.hypot(_rate_se(card[rate], card[n_key]), _rate_se(result[rate], result[n_key])),
        )
        assert abs(card[rate] - result[rate]) <= tolerance, (rate, card[rate], result[rate])

    text = (REPOSITORY / tool / "MODEL_CARD.md").read_text()
    assert "not for clinical use" in text
    assert f"{card['auc']:.4f}" in text and f"--n {card['n']} --seed {card['seed']}" in text


@pytest.mark.parametrize("tool", TOOLS)
def test_threshold_is_read_from_the_postprocess_config(tool):
    threshold = read_threshold(REPOSITORY, tool)
    assert threshold is None or 0.0 <= threshold <= 1.0


def test_read_threshold_parses_a_config(tmp_path):
    (tmp_path / "cxr_nodule_post").mkdir()
    (tmp_path / "cxr_nodule_post" / "config.pbtxt").write_text(
        'name: "cxr_nodule_post"\nparameters { key: "threshold" value { string_value: "0.35" } }\n'
    )
    assert read_threshold(tmp_path, "cxr_nodule") == 0.35
    assert read_threshold(tmp_path, "cxr_opacity") is None


def test_metric_helpers():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.4
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)  # rounded: ties
    pairs = scores[labels][:, None] - scores[~labels][None, :]
    brute = ((pairs > 0) + 0.5 * (pairs == 0)).mean()
    assert auc_score(scores, labels) == pytest.approx(brute)
    assert auc_score(-scores, labels) == pytest.approx(1 - brute)
    probability = np.full(100, 0.3)
    assert expected_calibration_error(probability, np.arange(100) < 30) == pytest.approx(0.0)
    assert expected_calibration_error(probability, np.arange(100) < 80) == pytest.approx(0.5)
    truth = np.array([100, 100, 140, 200], np.float32)  # 40 x 100, grown by 25 %: rows 95..145
    assert box_hit(np.array([130, 180, 160, 220]), truth)  # centre (145, 200)
    assert not box_hit(np.array([136, 180, 160, 220]), truth)  # centre (148, 200)
