"""Agreement figures of shadow runs (mosmedai.studies.shadow), on records made by hand with known counts.
The platform test (shadow on and off, stored records, the quality endpoint, `mosmedai tools
compare`) is in test_tool_config.py, on that module's platform."""

import pytest

from mosmedai.studies.shadow import agreement, format_comparison


def record(live: bool, candidate: bool, p_live=0.5, p_shadow=0.5, measurements=None, categories=None, region="RU-TA"):
    live_measurements, shadow_measurements = measurements or ({}, {})
    live_categories, shadow_categories = categories or ({}, {})
    return {"region": region, "live_version": "1", "shadow_version": "2",
            "live": {"positive": live, "probability": p_live, "measurements": live_measurements,
                     "categories": live_categories},
            "shadow": {"positive": candidate, "probability": p_shadow, "measurements": shadow_measurements,
                       "categories": shadow_categories}}


def test_positive_and_negative_agreement_and_kappa():
    # a = 40 both positive, b = 10 live only, c = 5 shadow only, d = 45 both negative
    records = ([record(True, True)] * 40 + [record(True, False)] * 10 + [record(False, True)] * 5
               + [record(False, False)] * 45)
    figures = agreement(records)
    assert figures["n"] == 100
    assert figures["positive_agreement"] == pytest.approx(80 / 95, abs=1e-4)
    assert figures["negative_agreement"] == pytest.approx(90 / 105, abs=1e-4)
    assert figures["overall_agreement"] == 0.85
    # Cohen: po 0.85, pe = 0.5 * 0.45 + 0.5 * 0.55 = 0.5 -> kappa 0.7
    assert figures["kappa"] == pytest.approx(0.7, abs=1e-4)


def test_kappa_for_categories_and_mean_absolute_difference_for_measurements():
    pairs = [("A", "A"), ("B", "B"), ("C", "B"), ("D", "D")]
    records = [record(True, True, 0.9, 0.7, ({"cobb_angle": 20.0}, {"cobb_angle": 23.0}),
                      ({"density_category": live}, {"density_category": shadow})) for live, shadow in pairs]
    figures = agreement(records)
    assert figures["probability_mean_absolute_difference"] == pytest.approx(0.2, abs=1e-4)
    assert figures["measurements"] == {"cobb_angle": {"n": 4, "mean_absolute_difference": 3.0}}
    category = figures["categories"]["density_category"]
    # po 0.75; pe = (1*1 + 1*2 + 1*0 + 1*1) / 16 = 0.25 -> kappa (0.75 - 0.25) / 0.75
    assert category["agreement"] == 0.75 and category["kappa"] == pytest.approx(2 / 3, abs=1e-4)
    # undefined figures are null, not a division by zero
    negative = agreement([record(False, False)] * 3)
    assert negative["positive_agreement"] is None and negative["negative_agreement"] == 1.0
    assert negative["kappa"] == 1.0
    assert agreement([])["kappa"] is None


def test_the_comparison_table_names_the_region_and_the_figures():
    text = format_comparison("cxr_opacity", 2, {("2", "RU-TA"): agreement([record(True, True), record(False, True)])})
    assert "cxr_opacity version 2" in text and "RU-TA" in text and "0.667" in text
    assert "no shadow runs" in format_comparison("cxr_opacity", 2, {})
