"""Fluorography: low-dose chest screening radiographs (triage, focal nodule, fibrosis).

Screening fluorograms are frontal chest films, often small (800-1200 pixels a side) and
8-bit. They are told apart from diagnostic chest X-ray by a Series Description keyword
(``chest_xray.FLUOROGRAPHY_KEYWORDS``: "FLUORO", "FLG", "ФЛГ", "ФЛЮОРО"): the chest X-ray
tools exclude those keywords and these tools require one (``required_keywords``).

Every tool's network gives a ``logit`` [1] and a ``heatmap`` [1, 32, 32] of logits over the
256 x 256 input, like the chest X-ray tools; the postprocess is the same Platt-calibrated
probability and the heatmap peak region's box in source pixels.
"""

from __future__ import annotations

import numpy as np

from mosmedai.catalog.families import IMAGE, Family, TensorSpec, ToolOutput, ToolSpec
from mosmedai.catalog.families.chest_xray import (
    FLUOROGRAPHY_KEYWORDS,
    PROJECTION_RADIOGRAPHY,
)
from mosmedai.catalog.imaging import NETWORK_SIZE

FAMILY = Family(name="fluorography", kind=IMAGE, preprocess="xr_preprocess")

HEATMAP_SIZE = NETWORK_SIZE // 8
NETWORK_OUTPUTS = (TensorSpec("logit", (1,)), TensorSpec("heatmap", (1, HEATMAP_SIZE, HEATMAP_SIZE)))

#: Operating thresholds on the calibrated probability, chosen on the calibration split
#: (see each tool's calibration.json: "suggested_threshold" and its rule). Triage is tuned
#: for screening: sensitivity >= 0.95 on the calibration split.
THRESHOLDS = {"flg_triage": 0.5, "flg_nodule": 0.44, "flg_fibrosis": 0.5}


def _tool(name: str, title: str, finding: str) -> ToolSpec:
    return ToolSpec(
        name=name, family=FAMILY, title=title, finding=finding,
        modalities=PROJECTION_RADIOGRAPHY, network_outputs=NETWORK_OUTPUTS,
        body_parts=frozenset({"CHEST", "THORAX", "LUNG"}), views=frozenset({"PA", "AP"}),
        view_alone_suffices=False,
        description_keywords=FLUOROGRAPHY_KEYWORDS,
        required_keywords=FLUOROGRAPHY_KEYWORDS,
        default_threshold=THRESHOLDS[name],
    )


TOOLS = (
    _tool("flg_triage", "Fluorography: normal/abnormal triage",
          "abnormal screening fluorogram (any finding: nodule, fibrosis, opacity)"),
    _tool("flg_nodule", "Fluorography: focal nodule", "focal lung nodule"),
    _tool("flg_fibrosis", "Fluorography: fibrotic / post-tuberculous changes",
          "fibrotic or post-tuberculous changes in an upper zone (strands, calcified foci, apical cap)"),
)


def postprocess(spec: ToolSpec, outputs: dict[str, np.ndarray], geometry: np.ndarray,
                volume: np.ndarray | None, calibration: dict, threshold: float) -> ToolOutput:
    """Platt-calibrated probability of the logit; the heatmap's peak region as the location
    (in source pixels, via the Letterbox), -1s when not positive."""
    from mosmedai.catalog.postprocess import Calibration
    from mosmedai.catalog.postprocess import postprocess as detect

    probability, positive, location = detect(outputs["logit"], outputs["heatmap"], geometry,
                                             Calibration(float(calibration["a"]), float(calibration["b"])),
                                             threshold)
    return ToolOutput(float(probability[0]), bool(positive[0]), location)
