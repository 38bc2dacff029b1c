"""Router outputs of a tool on a work item shaped into the API's results (``ToolResult``,
``ItemResult``): probabilities, findings with their location in source pixels (or the slice of
a volume), and measurements with their units."""

from __future__ import annotations

import math

from mosmedai.catalog.families import IMAGE, ToolSpec
from mosmedai.catalog.tools import CATALOG
from mosmedai.pipeline.work import WorkItem
from mosmedai.results.schemas import (
    Finding,
    ItemResult,
    Location,
    MeasurementValue,
    ToolResult,
)


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def measurement_values(spec: ToolSpec, values: list[float]) -> list[MeasurementValue]:
    out = []
    for measurement, value in zip(spec.measurements, values):
        value = _finite(value)
        if measurement.unit == "{slice}" and value is not None and value < 0:
            value = None  # a slice index of -1: nothing located
        if value is not None:
            value = round(value, 4)  # float32 from Triton: more digits would be noise
        label = None
        if measurement.is_category and value is not None:
            index = int(round(value))
            label = measurement.labels[index] if 0 <= index < len(measurement.labels) else None
        out.append(MeasurementValue(name=measurement.name, value=value, unit=measurement.unit, label=label))
    return out


def tool_result(tool: str, outputs: dict, item: WorkItem) -> ToolResult:
    """Router outputs of one tool on one work item -> the API's ToolResult."""
    spec = CATALOG[tool]
    probability = _finite(outputs["probability"])
    measurements = measurement_values(spec, outputs.get("measurements", []))
    findings = []
    if outputs["positive"]:
        location = None
        row0, col0, row1, col1 = outputs["location"]
        if row0 >= 0:
            if item.kind == IMAGE:
                rows, cols = item.factors  # transport pixels -> source pixels
                location = Location(row0=row0 * rows, col0=col0 * cols, row1=row1 * rows, col1=col1 * cols,
                                    sop_instance_uid=item.first.sop_instance_uid)
            else:
                slice_index = next((int(m.value) for m in measurements
                                    if m.name == "slice" and m.value is not None), None)
                uid = (item.images[slice_index].sop_instance_uid
                       if slice_index is not None and 0 <= slice_index < len(item.images) else None)
                location = Location(row0=row0, col0=col0, row1=row1, col1=col1, slice_index=slice_index,
                                    sop_instance_uid=uid)
        findings.append(Finding(finding=spec.finding, probability=probability, location=location))
    return ToolResult(
        tool=tool,
        title=spec.title,
        model_version=str(outputs.get("model_version") or ""),
        findings=findings,
        scores={} if probability is None else {"probability": probability},
        measurements=measurements,
        pool=str(outputs.get("pool") or ""),
        route=str(outputs.get("route") or ""),
    )


def item_result(item: WorkItem, outputs: dict[str, dict]) -> ItemResult:
    return ItemResult(
        series_instance_uid=item.first.series_instance_uid,
        modality=item.first.facts.modality,
        kind=item.kind,
        sop_instance_uids=[image.sop_instance_uid for image in item.images],
        tools=[tool_result(tool, outputs[tool], item) for tool in item.tools],
    )
