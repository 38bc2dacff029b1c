"""Radiologists' feedback on the tools' results: its validation, its durable idempotent
storage, and the per-version quality summary of a tool.

One feedback is one reviewer's verdict on one tool's result for one study of a tenant,
stored once in the results bucket::

    feedback/<tenant>/<tool>/records/<study>/<sha256(reviewer)>.json       the feedback
    feedback/<tenant>/<tool>/index/<version>/<verdict>/<reason>/<study>/<sha256(reviewer)>
                                                                           empty marker

Idempotency. The record is created with ``If-None-Match: *``: the first submission of a
(tenant, study, tool, reviewer) creates it (201, counted); the same verdict, reason and
comment again finds it and gets the stored one back (200, not counted again). A different
verdict, reason or comment from the same reviewer is refused (409 ``feedback_conflict``,
naming what differs): the first answer stands, because replacing it would make
``mosmedai_feedback_total`` count a study twice or count a verdict that no longer holds.

The index markers let the quality summary count a tool's feedback with one LIST (the key
holds version, verdict and reason) instead of one GET per feedback. The marker is written
after the record, and again whenever a submission finds the record, so a crash between
the two is repaired by the client's retry.

Which studies a tenant may give feedback on, and which model version answered, come from
``mosmedai.results.answered``.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Callable

from pydantic import ValidationError

from mosmedai.jobs.storage import ObjectStore
from mosmedai.pipeline.errors import InputError
from mosmedai.results.answered import version_label
from mosmedai.results.schemas import REASONS, VERDICTS, FeedbackIn

#: Largest feedback body accepted (bytes): a comment of 2,000 characters fits many times over.
MAX_BODY_BYTES = 64 * 1024

def no_feedback() -> dict:
    """The counts of a version nobody judged yet."""
    return {"total": 0, **{v: 0 for v in VERDICTS}, "reasons": {r: 0 for r in REASONS},
            "disagreement_rate": None}


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def parse(body: bytes) -> FeedbackIn:
    """The request body -> FeedbackIn; InputError naming the field otherwise (400 not JSON,
    422 a field wrong)."""
    if not body.strip():
        raise InputError(400, "empty_body", "the body is empty; send a JSON object "
                         '{"tool", "verdict", "reason", "reviewer", "comment"}')
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(400, "not_json", f"the body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise InputError(422, "invalid_feedback", f"the body is {_json_type(data)}; send a JSON object",
                         fields=[])
    try:
        entry = FeedbackIn.model_validate(data)
    except ValidationError as error:
        problems, fields = [], []
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"]) or "(body)"
            fields.append(field)
            got = f" (got {problem['input']!r})" if problem["type"] not in ("missing",) else ""
            problems.append(f"field '{field}': {problem['msg']}{got}"[:300])
        raise InputError(422, "invalid_feedback", "; ".join(problems), fields=sorted(set(fields))) from None
    reviewer = entry.reviewer.strip()
    if not reviewer or any(ord(c) < 0x20 or ord(c) == 0x7F for c in reviewer):
        raise InputError(422, "invalid_feedback", "field 'reviewer': must be a non-empty identifier without "
                         "control characters", fields=["reviewer"])
    if entry.verdict == "disagree" and entry.reason is None:
        raise InputError(422, "invalid_feedback", f"field 'reason': verdict 'disagree' needs a reason, one of "
                         f"{list(REASONS)}", fields=["reason"])
    if entry.verdict != "disagree" and entry.reason is not None:
        raise InputError(422, "invalid_feedback", f"field 'reason': a reason goes only with verdict 'disagree'; "
                         f"the verdict is {entry.verdict!r}: send reason null", fields=["reason"])
    comment = entry.comment if entry.comment is None or entry.comment.strip() else None
    return entry.model_copy(update={"reviewer": reviewer, "comment": comment})


def reviewer_id(reviewer: str) -> str:
    return hashlib.sha256(reviewer.encode("utf-8")).hexdigest()[:32]


def record_key(tenant: str, tool: str, study_uid: str, reviewer: str) -> str:
    return f"feedback/{tenant}/{tool}/records/{study_uid}/{reviewer_id(reviewer)}.json"


def index_key(tenant: str, stored: dict) -> str:
    return (f"feedback/{tenant}/{stored['tool']}/index/{stored['model_version']}/{stored['verdict']}/"
            f"{stored['reason'] or 'none'}/{stored['study_instance_uid']}/{reviewer_id(stored['reviewer'])}")


SAME = ("verdict", "reason", "comment")


class FeedbackStore:
    """Feedback in the object store (blocking calls: run them in a thread)."""

    def __init__(self, store: ObjectStore, bucket: str, clock: Callable[[], float] = time.time):
        self.store, self.bucket, self.clock = store, bucket, clock

    def submit(self, tenant: str, study_uid: str, entry: FeedbackIn, answered: dict) -> tuple[dict, bool]:
        """Store the feedback on ``answered`` (the tool's entry of the study record): (stored,
        True) when created, (stored, False) when the same was stored before; InputError 409
        when this reviewer stored something else."""
        stored = {"study_instance_uid": study_uid, "tool": entry.tool,
                  "model_version": version_label(answered.get("model_version", "")),
                  "verdict": entry.verdict, "reason": entry.reason, "reviewer": entry.reviewer,
                  "comment": entry.comment, "result_positive": bool(answered.get("positive")),
                  "received_at": self.clock()}
        key = record_key(tenant, entry.tool, study_uid, entry.reviewer)
        body = json.dumps(stored, sort_keys=True, separators=(",", ":")).encode()
        created = self.store.put(self.bucket, key, body, if_none_match=True, content_type="application/json")
        if created is None:
            earlier = json.loads(self.store.get(self.bucket, key))
            different = [name for name in SAME if earlier.get(name) != stored[name]]
            if different:
                raise InputError(409, "feedback_conflict",
                                 f"reviewer {entry.reviewer!r} already gave feedback on {entry.tool} for study "
                                 f"{study_uid} with another {', '.join(different)}: "
                                 + ", ".join(f"{name} {earlier.get(name)!r}" for name in different)
                                 + "; feedback is final, the first answer stands",
                                 fields=different, stored=earlier)
            stored = earlier
        self.store.put(self.bucket, index_key(tenant, stored), b"")
        return stored, created is not None

    def summary(self, tenant: str, tool: str) -> dict[str, dict]:
        """Counts of the tenant's feedback on the tool, per model version."""
        prefix = f"feedback/{tenant}/{tool}/index/"
        versions: dict[str, dict] = {}
        for key in self.store.list(self.bucket, prefix):
            parts = key[len(prefix):].split("/")
            if len(parts) != 5 or parts[1] not in VERDICTS:
                continue
            version, verdict, reason = parts[0], parts[1], parts[2]
            counts = versions.setdefault(version, no_feedback())
            counts["total"] += 1
            counts[verdict] += 1
            if verdict == "disagree" and reason in counts["reasons"]:
                counts["reasons"][reason] += 1
        for counts in versions.values():
            judged = counts["agree"] + counts["disagree"]
            counts["disagreement_rate"] = counts["disagree"] / judged if judged else None
        return versions
