from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar
from typing import Optional as _Optional
from typing import Union as _Union

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitRequest(_message.Message):
    __slots__ = ("instances", "tools", "idempotency_key")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedScalarFieldContainer[bytes]
    tools: _containers.RepeatedScalarFieldContainer[str]
    idempotency_key: str
    def __init__(self, instances: _Optional[_Iterable[bytes]] = ..., tools: _Optional[_Iterable[str]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class GetStudyRequest(_message.Message):
    __slots__ = ("study_instance_uid",)
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    def __init__(self, study_instance_uid: _Optional[str] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("row0", "col0", "row1", "col1", "unit", "slice_index", "sop_instance_uid")
    ROW0_FIELD_NUMBER: _ClassVar[int]
    COL0_FIELD_NUMBER: _ClassVar[int]
    ROW1_FIELD_NUMBER: _ClassVar[int]
    COL1_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    SLICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    row0: float
    col0: float
    row1: float
    col1: float
    unit: str
    slice_index: int
    sop_instance_uid: str
    def __init__(self, row0: _Optional[float] = ..., col0: _Optional[float] = ..., row1: _Optional[float] = ..., col1: _Optional[float] = ..., unit: _Optional[str] = ..., slice_index: _Optional[int] = ..., sop_instance_uid: _Optional[str] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("finding", "probability", "location")
    FINDING_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    finding: str
    probability: float
    location: Location
    def __init__(self, finding: _Optional[str] = ..., probability: _Optional[float] = ..., location: _Optional[_Union[Location, _Mapping]] = ...) -> None: ...

class MeasurementValue(_message.Message):
    __slots__ = ("name", "value", "unit", "label")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    unit: str
    label: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., unit: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class ToolResult(_message.Message):
    __slots__ = ("tool", "title", "model_version", "findings", "scores", "measurements", "pool", "route")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TOOL_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    tool: str
    title: str
    model_version: str
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    scores: _containers.ScalarMap[str, float]
    measurements: _containers.RepeatedCompositeFieldContainer[MeasurementValue]
    pool: str
    route: str
    def __init__(self, tool: _Optional[str] = ..., title: _Optional[str] = ..., model_version: _Optional[str] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., scores: _Optional[_Mapping[str, float]] = ..., measurements: _Optional[_Iterable[_Union[MeasurementValue, _Mapping]]] = ..., pool: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("series_instance_uid", "modality", "kind", "sop_instance_uids", "tools")
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UIDS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    series_instance_uid: str
    modality: str
    kind: str
    sop_instance_uids: _containers.RepeatedScalarFieldContainer[str]
    tools: _containers.RepeatedCompositeFieldContainer[ToolResult]
    def __init__(self, series_instance_uid: _Optional[str] = ..., modality: _Optional[str] = ..., kind: _Optional[str] = ..., sop_instance_uids: _Optional[_Iterable[str]] = ..., tools: _Optional[_Iterable[_Union[ToolResult, _Mapping]]] = ...) -> None: ...

class StudyResults(_message.Message):
    __slots__ = ("study_instance_uid", "results", "timings_ms", "disclaimer")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    DISCLAIMER_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    timings_ms: _containers.ScalarMap[str, float]
    disclaimer: str
    def __init__(self, study_instance_uid: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., disclaimer: _Optional[str] = ...) -> None: ...

class StudyStatus(_message.Message):
    __slots__ = ("study_instance_uid", "status", "job_id", "error", "results")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    status: str
    job_id: str
    error: str
    results: StudyResults
    def __init__(self, study_instance_uid: _Optional[str] = ..., status: _Optional[str] = ..., job_id: _Optional[str] = ..., error: _Optional[str] = ..., results: _Optional[_Union[StudyResults, _Mapping]] = ...) -> None: ...
