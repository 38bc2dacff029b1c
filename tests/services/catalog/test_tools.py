"""Tool selection from the DICOM header (mosmedai.catalog.tools)."""

import pytest

from mosmedai.catalog.tools import CATALOG, HeaderFacts, select_tools

CHEST = ["cxr_opacity", "cxr_nodule", "cxr_pneumothorax"]


@pytest.mark.parametrize(
    "facts, expected",
    [
        (HeaderFacts(modality="DX", body_part="CHEST"), CHEST),
        (HeaderFacts(modality="CR", view_position="PA"), CHEST),
        (HeaderFacts(modality="DR", view_position="AP"), CHEST),
        (HeaderFacts(modality="CR", series_description="CHEST PA ERECT"), CHEST),
        (HeaderFacts(modality="DX", body_part="HAND", view_position="PA"), []),  # a PA hand film
        (HeaderFacts(modality="US", body_part="CHEST"), []),
        (HeaderFacts(modality="MR", body_part="CHEST"), []),
        (HeaderFacts(modality="DX"), []),
    ],
)
def test_tools_are_chosen_from_the_header(facts, expected):
    assert [spec.name for spec in select_tools(facts, CHEST)] == expected


def test_only_enabled_tools_are_chosen():
    facts = HeaderFacts(modality="DX", body_part="CHEST")
    assert [spec.name for spec in select_tools(facts, ["cxr_nodule"])] == ["cxr_nodule"]


def test_every_tool_names_its_three_steps():
    for spec in CATALOG.values():
        assert spec.network_model == f"{spec.name}_net"
        assert spec.postprocess_model == f"{spec.name}_post"
        assert spec.preprocess_model == spec.family.preprocess
