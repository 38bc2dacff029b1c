"""Wire formats of the study API (JSON). OpenAPI at /openapi.json is generated from these."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Location(BaseModel):
    """Bounding box of a finding in source-image pixels (row = y, col = x), DICOM pixel
    order: (0, 0) is the top-left pixel as stored, rows down, columns right."""

    row0: float
    col0: float
    row1: float
    col1: float
    unit: str = "pixel"
    slice_index: int | None = Field(None, description="Volume tools: index of the slice in the series ordered along the slice normal")
    sop_instance_uid: str | None = Field(None, description="The image the box is drawn on (volume tools: the key slice)")


class MeasurementValue(BaseModel):
    name: str = Field(description="What is measured, e.g. cobb_angle")
    value: float | None = Field(description="The value in `unit`; a category's index into its labels; null when not measurable")
    unit: str = Field(description="UCUM unit: mm, deg, %, [hnsf'U]; {category} for categories; {slice} for slice indices")
    label: str | None = Field(None, description="A category's label, e.g. CT-2")


class Finding(BaseModel):
    finding: str = Field(description="What the tool found, in words")
    probability: float | None = Field(None, ge=0.0, le=1.0, description="Calibrated probability of the finding; null for tools that only measure")
    location: Location | None = None


class ToolResult(BaseModel):
    tool: str = Field(description="Tool name (the Triton ensemble)")
    title: str
    model_version: str = Field(description="The tool version that produced this result (the model repository's "
                               "version of the tool's network; also the SR's Algorithm Version, TID 4019)")
    findings: list[Finding] = Field(description="Positive findings at the tool's threshold; empty when none")
    scores: dict[str, float] = Field(description="Raw scores, e.g. the calibrated probability")
    measurements: list[MeasurementValue] = Field(default_factory=list, description="Physical quantities and categories the tool reports")
    pool: str = Field("", description="The Triton pool that ran the tool (GET /v1/pools)")
    route: str = Field("", description="How the study reached that pool: home, spill (home pool busy) or "
                       "failover (home pool down)")


class StudyResult(BaseModel):
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    tools: list[ToolResult]
    timings_ms: dict[str, float] = Field(description="decode, inference, triton and total, milliseconds")
    disclaimer: str = "AI result, not a diagnosis. Reference models trained on synthetic data; not for clinical use."


class ItemResult(BaseModel):
    """The results of one image, or of one volume series (CT tools read a whole series)."""

    series_instance_uid: str
    modality: str
    kind: str = Field(description="image or volume")
    sop_instance_uids: list[str] = Field(description="The instances read: one image, or the series' slices in order")
    tools: list[ToolResult]


class StudyResults(BaseModel):
    """A multi-instance submission: one entry per image and per volume series."""

    study_instance_uid: str
    results: list[ItemResult]
    timings_ms: dict[str, float]
    disclaimer: str = "AI result, not a diagnosis. Reference models trained on synthetic data; not for clinical use."


class StudyStatus(BaseModel):
    """An asynchronous study: accepted, running, done (with results) or failed (with the reason)."""

    study_instance_uid: str
    status: str = Field(description="accepted, running, done or failed")
    job_id: str
    error: str | None = Field(None, description="failed: why")
    results: StudyResults | None = None


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable error code")
    detail: str = Field(description="What is wrong, in words")


class PoolInfo(BaseModel):
    """One Triton pool as the router sees it (GET /v1/pools)."""

    name: str
    regions: list[str] = Field(description="ISO 3166-2:RU regions whose own pool it is")
    districts: list[str] = Field(default_factory=list, description="Federal districts it serves for regions without a pool")
    endpoint: str = Field(description="gRPC host:port of the pool's (first) Triton")
    state: str = Field(description="up, ejected (failed answers; probed back in) or not_ready")
    tools: list[str]
    neighbours: list[str] = Field(description="Spill-over and failover targets, nearest first")
    in_flight: int = Field(description="Images queued in the router for the pool or in its Triton")
    expected_wait_s: float = Field(description="Expected wait of a new routine image (s)")


class PoolsAnswer(BaseModel):
    pools: list[PoolInfo]


# --- radiologists' feedback (mosmedai.results.feedback) ------------------------------------------------
VERDICTS = ("agree", "disagree", "image_defect")
REASONS = ("false_positive", "false_negative", "wrong_location", "wrong_measurement")


class FeedbackIn(BaseModel):
    """A radiologist's verdict on one tool's result for one study."""

    model_config = {"extra": "forbid"}

    tool: str = Field(description="The tool whose result is judged (it must have run on the study)")
    verdict: Literal["agree", "disagree", "image_defect"] = Field(
        description="agree / disagree with the result; image_defect: the image was not fit to be read")
    reason: Literal["false_positive", "false_negative", "wrong_location", "wrong_measurement"] | None = Field(
        None, description="Why the reviewer disagrees: required with verdict disagree, null otherwise")
    reviewer: str = Field(min_length=1, max_length=200,
                          description="The reviewer's identifier at the tenant (a pseudonymous id, not a name)")
    comment: str | None = Field(None, max_length=2000, description="Free text, optional")


class Feedback(BaseModel):
    """Feedback as stored (the answer of POST /v1/studies/{uid}/feedback)."""

    study_instance_uid: str
    tool: str
    model_version: str = Field(description="The Triton model version whose result was judged")
    verdict: str
    reason: str | None
    reviewer: str
    comment: str | None
    result_positive: bool = Field(description="Whether the tool reported a finding on the study")
    received_at: float = Field(description="When the platform stored the feedback (Unix seconds)")


class FeedbackCounts(BaseModel):
    total: int
    agree: int
    disagree: int
    image_defect: int
    disagreement_rate: float | None = Field(
        description="disagree / (agree + disagree); image defects are left out (they judge the image, not "
        "the tool); null when there is no agree or disagree")
    reasons: dict[str, int] = Field(description="disagree verdicts by reason")


class CategoryAgreement(BaseModel):
    n: int
    agreement: float | None
    kappa: float | None = Field(description="Cohen's kappa of the category labels")


class MeasurementAgreement(BaseModel):
    n: int
    mean_absolute_difference: float = Field(description="Mean |live - shadow|, in the measurement's unit")


class ShadowAgreement(BaseModel):
    """How a version's shadow runs agree with the live version's answers (mosmedai.studies.shadow)."""

    n: int = Field(description="Images (or CT series) run in shadow")
    both_positive: int
    both_negative: int
    live_only_positive: int
    shadow_only_positive: int
    positive_agreement: float | None = Field(description="2a / (2a + b + c)")
    negative_agreement: float | None = Field(description="2d / (2d + b + c)")
    overall_agreement: float | None
    kappa: float | None = Field(description="Cohen's kappa of positive/negative")
    probability_mean_absolute_difference: float | None
    categories: dict[str, CategoryAgreement]
    measurements: dict[str, MeasurementAgreement]
    live_versions: list[str] = Field(description="The live versions it was compared with")


class VersionQuality(BaseModel):
    model_version: str
    region: str = Field(description="The caller tenant's region (ISO 3166-2:RU)")
    feedback: FeedbackCounts
    shadow_agreement: ShadowAgreement | None = Field(
        None, description="Agreement of this version's shadow runs on the tenant's studies with the live "
        "version; null when it ran in shadow on none")


class ToolQuality(BaseModel):
    """GET /v1/tools/{tool}/quality: the caller tenant's feedback on a tool, per model version."""

    tool: str
    tenant: str
    region: str
    versions: list[VersionQuality]
    shadow_agreement_status: str = Field(description="Why shadow_agreement is null")


class ToolVersionInfo(BaseModel):
    version: int = Field(description="The tool version (its ensemble: `<tool>` for 1, `<tool>_v<N>` after)")
    ensemble: str = Field(description="The Triton ensemble that runs it")
    in_repository: bool = Field(description="Whether the model repository holds its ensemble")
    model_card: str | None = Field(description="Path of its model card in the model repository; null when absent")
    evaluation: dict | None = Field(
        description="Its held-out evaluation summary (n, auc, sensitivity, specificity at the threshold, ...); "
        "null when the repository has none")


class ToolInfo(BaseModel):
    tool: str
    title: str
    versions: list[ToolVersionInfo] = Field(description="Every version the catalog and repository hold")
    enabled: bool = Field(description="Whether the caller (its region, or its own override) gets this tool's results")
    live_version: int | None = Field(description="The version that answers the caller; null when not enabled")
    shadow: dict | None = Field(
        None, description="A candidate version run in shadow on a share of the caller's images ({version, share}); "
        "its results are never returned, only compared with the live ones; null when none")


class ToolsAnswer(BaseModel):
    """GET /v1/tools: every tool, its versions, and what is enabled and live for the caller."""

    tenant: str
    region: str
    tools: list[ToolInfo]
