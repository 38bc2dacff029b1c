"""Chest X-ray: lung opacity, focal nodule and pneumothorax on frontal radiographs."""

from __future__ import annotations

import numpy as np

from mosmedai.catalog.families import IMAGE, Family, TensorSpec, ToolOutput, ToolSpec
from mosmedai.catalog.imaging import NETWORK_SIZE

FAMILY = Family(name="chest_xray", kind=IMAGE, preprocess="xr_preprocess")

#: Modality (0008,0060) values of projection radiography.
PROJECTION_RADIOGRAPHY = frozenset({"CR", "DX", "DR"})
#: Series Description keywords of low-dose screening fluorography (its own tools read those).
FLUOROGRAPHY_KEYWORDS = ("FLUORO", "FLG", "ФЛГ", "ФЛЮОРО")
HEATMAP_SIZE = NETWORK_SIZE // 8
NETWORK_OUTPUTS = (TensorSpec("logit", (1,)), TensorSpec("heatmap", (1, HEATMAP_SIZE, HEATMAP_SIZE)))


def _tool(name: str, title: str, finding: str, versions: tuple[int, ...] = (1,)) -> ToolSpec:
    return ToolSpec(
        name=name, family=FAMILY, title=title, finding=finding,
        modalities=PROJECTION_RADIOGRAPHY, network_outputs=NETWORK_OUTPUTS,
        body_parts=frozenset({"CHEST", "THORAX", "LUNG"}), views=frozenset({"PA", "AP"}),
        view_alone_suffices=True,
        description_keywords=("CHEST", "THORAX", "LUNG", "ГРУД", "ОГК"),
        exclude_keywords=FLUOROGRAPHY_KEYWORDS, versions=versions,
    )


TOOLS = (
    # version 2: a slimmer candidate network (mosmedai_training.train.RECIPES)
    _tool("cxr_opacity", "Chest X-ray: lung opacity", "lung opacity (consolidation)", versions=(1, 2)),
    _tool("cxr_nodule", "Chest X-ray: focal nodule", "focal lung nodule"),
    _tool("cxr_pneumothorax", "Chest X-ray: pneumothorax", "pneumothorax"),
)


def postprocess(spec: ToolSpec, outputs: dict[str, np.ndarray], geometry: np.ndarray,
                volume: np.ndarray | None, calibration: dict, threshold: float) -> ToolOutput:
    """Platt-calibrated probability of the logit; the heatmap's peak region as the location."""
    from mosmedai.catalog.postprocess import Calibration
    from mosmedai.catalog.postprocess import postprocess as detect

    probability, positive, location = detect(outputs["logit"], outputs["heatmap"], geometry,
                                             Calibration(float(calibration["a"]), float(calibration["b"])),
                                             threshold)
    return ToolOutput(float(probability[0]), bool(positive[0]), location)
