"""Wire formats of the study API (JSON). OpenAPI at /openapi.json is generated from these."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Location(BaseModel):
    """Bounding box of a finding in source-image pixels (row = y, col = x), DICOM pixel
    order: (0, 0) is the top-left pixel as stored, rows down, columns right."""

    row0: float
    col0: float
    row1: float
    col1: float
    unit: str = "pixel"


class Finding(BaseModel):
    finding: str = Field(description="What the tool found, in words")
    probability: float = Field(ge=0.0, le=1.0, description="Calibrated probability of the finding")
    location: Location | None = None


class ToolResult(BaseModel):
    tool: str = Field(description="Tool name (the Triton ensemble)")
    title: str
    model_version: str = Field(description="Triton model version that answered")
    findings: list[Finding] = Field(description="Positive findings at the tool's threshold; empty when none")
    scores: dict[str, float] = Field(description="Raw scores, e.g. the calibrated probability")


class StudyResult(BaseModel):
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    tools: list[ToolResult]
    timings_ms: dict[str, float] = Field(description="decode, inference, triton and total, milliseconds")
    disclaimer: str = "AI result, not a diagnosis. Reference models trained on synthetic data; not for clinical use."


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable error code")
    detail: str = Field(description="What is wrong, in words")
