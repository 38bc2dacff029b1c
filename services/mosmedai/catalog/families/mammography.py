"""Mammography: mass, calcification cluster and breast density on CC/MLO mammograms.

Routing: Modality MG with View Position CC or MLO (the modality decides; no Body Part
Examined needed), or a Series Description with "MAMMO"/"МАММ". Both lateralities: the
networks learnt left (chest wall on the image's left) and right (chest wall on the right)
breasts alike.

Network outputs (input ``image`` [N, 1, 256, 256] from ``xr_preprocess``):

- ``mg_mass``, ``mg_calcification``: ``logit`` [1] and ``heatmap`` [1, 32, 32] (logits over
  the network input, one cell = 8 x 8 network pixels), as the chest X-ray tools; Platt
  scaling gives the probability, the heatmap's peak region the box (source pixels).
- ``mg_density``: ``density_logits`` [4], one per ACR category a-d. The reported category is
  the most likely one (measurement ``density_category``, value 0..3 = labels A..D); there is
  no probability (NaN) and ``positive`` means dense breasts: category C or D.
"""

from __future__ import annotations

import math

import numpy as np

from mosmedai.catalog.families import (
    IMAGE,
    NO_LOCATION,
    Family,
    Measurement,
    TensorSpec,
    ToolOutput,
    ToolSpec,
)
from mosmedai.catalog.imaging import NETWORK_SIZE

FAMILY = Family(name="mammography", kind=IMAGE, preprocess="xr_preprocess")

MAMMOGRAPHY = frozenset({"MG"})
VIEWS = frozenset({"CC", "MLO"})
KEYWORDS = ("MAMMO", "МАММ")
HEATMAP_SIZE = NETWORK_SIZE // 8
DETECTION_OUTPUTS = (TensorSpec("logit", (1,)), TensorSpec("heatmap", (1, HEATMAP_SIZE, HEATMAP_SIZE)))
DENSITY_LABELS = ("A", "B", "C", "D")
DENSITY_OUTPUTS = (TensorSpec("density_logits", (len(DENSITY_LABELS),)),)
#: Categories (indices into DENSITY_LABELS) that make `mg_density` positive: C and D, dense breasts.
DENSE_CATEGORIES = (2, 3)


def _tool(name: str, title: str, finding: str, outputs, threshold: float, **extra) -> ToolSpec:
    return ToolSpec(
        name=name, family=FAMILY, title=title, finding=finding,
        modalities=MAMMOGRAPHY, network_outputs=outputs,
        views=VIEWS, description_keywords=KEYWORDS,
        default_threshold=threshold, **extra,
    )


TOOLS = (
    _tool("mg_mass", "Mammography: mass", "breast mass (round or spiculated, 5-25 mm)", DETECTION_OUTPUTS, 0.26),
    _tool("mg_calcification", "Mammography: calcification cluster",
          "cluster of microcalcifications (5-20 specks within about 10 mm)", DETECTION_OUTPUTS, 0.22),
    _tool("mg_density", "Mammography: breast density (ACR a-d)",
          "dense breast tissue: ACR density category C or D", DENSITY_OUTPUTS, 0.5,
          has_probability=False,
          measurements=(Measurement("density_category", "{category}",
                                    "ACR BI-RADS breast density category (a: almost entirely fatty, b: scattered "
                                    "fibroglandular, c: heterogeneously dense, d: extremely dense)",
                                    labels=DENSITY_LABELS),)),
)


def density_category(logits: np.ndarray) -> int:
    """The most likely density category (index into DENSITY_LABELS) of the network's logits."""
    logits = np.asarray(logits, np.float64).reshape(-1)[: len(DENSITY_LABELS)]
    if not np.all(np.isfinite(logits)):
        raise ValueError(f"density logits are not finite: {logits}")
    return int(np.argmax(logits))


def postprocess(spec: ToolSpec, outputs: dict[str, np.ndarray], geometry: np.ndarray,
                volume: np.ndarray | None, calibration: dict, threshold: float) -> ToolOutput:
    """Detection tools: Platt-calibrated probability of the logit, the heatmap's peak region
    as the box. Density: the argmax category as the measurement; positive for C or D."""
    if spec.name == "mg_density":
        category = density_category(outputs["density_logits"])
        return ToolOutput(math.nan, category in DENSE_CATEGORIES, NO_LOCATION.copy(),
                          np.array([category], np.float32))

    from mosmedai.catalog.postprocess import Calibration
    from mosmedai.catalog.postprocess import postprocess as detect

    probability, positive, location = detect(outputs["logit"], outputs["heatmap"], geometry,
                                             Calibration(float(calibration["a"]), float(calibration["b"])),
                                             threshold)
    return ToolOutput(float(probability[0]), bool(positive[0]), location)
