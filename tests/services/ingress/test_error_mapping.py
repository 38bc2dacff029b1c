"""Every domain error (mosmedai.pipeline.errors) maps in every door: the HTTP study API, DICOMweb
STOW-RS, DIMSE C-STORE and the gRPC study service. Each door's own mapping function is called on
the same list; a refusal under load says "later" in every protocol, a bad request says "never
as it is", and no error falls through to a door's catch-all (gRPC UNKNOWN, HTTP 500)."""

from __future__ import annotations

import json

import grpc
import pytest

from mosmedai.ingress.dicomweb.stow import FAILURE_REASONS, OUT_OF_RESOURCES as STOW_OUT_OF_RESOURCES, failure_reason
from mosmedai.ingress.dimse_checks import (CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS, OUT_OF_RESOURCES,
                                           PROCESSING_FAILURE, SUCCESS, dimse_status)
from mosmedai.ingress.grpc_door import GRPC_CODE, grpc_status
from mosmedai.ingress.http_errors import http_answer
from mosmedai.pipeline.errors import InputError, Refused, ToolsFailed

#: What the layers below the doors raise (codes as the platform uses them).
DOMAIN_ERRORS = [
    InputError(400, "bad_prefer_wait", "Prefer: wait='x' is not a positive number of seconds"),
    InputError(403, "forbidden", "no study 1.2.3 is visible to tenant demo-moscow"),
    InputError(404, "unknown_tool", "'x' is not a tool enabled here"),
    InputError(409, "version_not_loaded", "versions: cxr_opacity version 2 is not loaded here"),
    InputError(413, "body_too_large", "the body exceeds the limit"),
    InputError(415, "unsupported_media_type", "Content-Type is 'text/plain'"),
    InputError(422, "not_dicom", "the body is not a DICOM Part-10 file"),
    InputError(422, "no_tool_accepts", "no enabled tool reads this image", looked_at={}, unmatched=[]),
    InputError(422, "sop_class_mismatch", "the file meta's SOP Class differs"),
    InputError(503, "storage_unavailable", "the study could not be stored and was NOT accepted"),
    ToolsFailed({"cxr_opacity": {"status": 502, "error": "Triton: model error"}}),
    ToolsFailed({"cxr_opacity": {"status": 504, "error": "deadline exceeded in Triton"}}),
    ToolsFailed({"cxr_opacity": {"status": 503, "error": "no pool can take it", "reason": "overloaded",
                                 "retry_after_s": 3}}),
    ToolsFailed({"cxr_opacity": {"status": 429, "error": "over the tenant's share", "reason": "fair_share",
                                 "retry_after_s": 2}}),
    Refused(503, "overloaded", "the platform cannot answer within the deadline", 2),
    Refused(429, "fair_share", "tenant demo-moscow has 3 studies waiting", 1),
    Refused(503, "draining", "this gateway replica is shutting down", 1, close=True),
]
IDS = [f"{type(e).__name__}-{e.status}-{getattr(e, 'code', None) or getattr(e, 'reason', None)}" for e in DOMAIN_ERRORS]
#: Refusals that mean "come back later": every door must say so.
LATER = (429, 503, 504)
#: Too much at once (413): a resource limit, as each protocol names one.
TOO_MUCH = 413


@pytest.mark.parametrize("error", DOMAIN_ERRORS, ids=IDS)
def test_http_answers_the_status_the_error_carries(error) -> None:
    answer = http_answer(error)
    assert answer.status_code == error.status
    body = json.loads(answer.body)
    assert isinstance(body["error"], str) and body["error"] and "detail" in body
    if error.status in (429, 503) and not isinstance(error, InputError):
        assert int(answer.headers["retry-after"]) >= 1 and body["retry_after_s"] == int(answer.headers["retry-after"])
    if isinstance(error, Refused) and error.reason == "draining":
        assert answer.headers["connection"] == "close"


@pytest.mark.parametrize("error", DOMAIN_ERRORS, ids=IDS)
def test_grpc_maps_every_error_to_a_defined_code(error) -> None:
    code, details, trailers = grpc_status(error)
    assert code is GRPC_CODE[error.status] and code is not grpc.StatusCode.UNKNOWN
    assert details.split(":")[0] == (error.code if isinstance(error, InputError) else error.as_json()["error"])
    if error.status in (429, 503) and not isinstance(error, InputError):
        assert dict(trailers)["retry-after"] == str(error.retry_after_s)
        assert dict(trailers)["grpc-retry-pushback-ms"] == str(error.retry_after_s * 1000)
    if error.status in LATER or error.status == TOO_MUCH:
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        grpc.StatusCode.DEADLINE_EXCEEDED)
    elif error.status >= 500:
        assert code is grpc.StatusCode.INTERNAL
    else:  # the caller's mistake: never a status that invites a retry
        assert code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)


@pytest.mark.parametrize("error", DOMAIN_ERRORS, ids=IDS)
def test_dimse_maps_every_error_to_a_failure_status(error) -> None:
    status = dimse_status(error)
    assert status != SUCCESS
    if error.status in LATER or error.status == TOO_MUCH:
        assert status == OUT_OF_RESOURCES  # PS3.4 B.2.3: the sender retries later
    elif isinstance(error, InputError) and error.code == "sop_class_mismatch":
        assert status == DOES_NOT_MATCH_SOP_CLASS
    elif error.status >= 500:
        assert status == PROCESSING_FAILURE
    else:
        assert status == CANNOT_UNDERSTAND


@pytest.mark.parametrize("error", [e for e in DOMAIN_ERRORS if isinstance(e, InputError)],
                         ids=[i for e, i in zip(DOMAIN_ERRORS, IDS) if isinstance(e, InputError)])
def test_stow_names_a_failure_reason_for_every_refused_instance(error) -> None:
    """STOW-RS refuses instances one by one (PS3.18 I.2.2 Failure Reason); a refusal of the whole
    request (the gate, the tools) is the HTTP door's, above."""
    reason = failure_reason(error.code)
    assert 0x0100 <= reason <= 0xFFFF
    if error.status in LATER:
        assert reason == STOW_OUT_OF_RESOURCES
    if error.code in FAILURE_REASONS:
        assert reason == FAILURE_REASONS[error.code]


@pytest.mark.parametrize("mapper", [http_answer, grpc_status, dimse_status])
def test_a_non_domain_error_is_not_mapped_as_one(mapper) -> None:
    with pytest.raises(TypeError):
        mapper(RuntimeError("a bug"))
