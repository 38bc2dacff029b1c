"""Radiologists' feedback on the real platform (gateway, router, Triton, the local S3 server):
POST /v1/studies/{uid}/feedback and GET /v1/tools/{tool}/quality. Nothing of ours is mocked;
what is stored is read back from the object store itself."""

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mosmedai.results import answered

from mosmedai.results import feedback
from mosmedai.jobs.storage import ObjectStore
from mosmedai.ingress.tenants import DEMO_TOKENS, auth_headers
from mosmedai.phantoms.chest_xray import dicom_bytes, make_phantom

# Phantom seeds of these tests: apart from the training, calibration and other tests' seeds.
TEST_SEED = 7_300_001
DICOM = {"Content-Type": "application/dicom"}
MOSCOW, TATARSTAN = "demo-moscow", "demo-tatarstan"
TOOL = "cxr_opacity"


@pytest.fixture(scope="module")
def moscow(platform):
    with httpx.Client(base_url=platform["gateway"], timeout=120.0,
                      headers=auth_headers(DEMO_TOKENS[MOSCOW])) as client:
        yield client


@pytest.fixture(scope="module")
def tatarstan(platform):
    with httpx.Client(base_url=platform["gateway"], timeout=120.0,
                      headers=auth_headers(DEMO_TOKENS[TATARSTAN])) as client:
        yield client


@pytest.fixture(scope="module")
def store(platform_settings):
    return ObjectStore.local(platform_settings.s3_endpoint)


@pytest.fixture(scope="module")
def study(moscow) -> dict:
    """A chest radiograph of demo-moscow, answered synchronously."""
    phantom = make_phantom((TEST_SEED, 1), shape=(700, 600), findings=[TOOL])
    answer = moscow.post("/v1/studies", content=dicom_bytes(phantom), headers=DICOM)
    assert answer.status_code == 200, answer.text
    return answer.json()


def give(client, study_uid: str, **fields) -> httpx.Response:
    body = {"tool": TOOL, "verdict": "agree", "reason": None, "reviewer": "rad-001", **fields}
    return client.post(f"/v1/studies/{study_uid}/feedback", json=body)


def feedback_count(client, tool: str, version: str, region: str, verdict: str) -> float | None:
    """mosmedai_feedback_total of these labels on the gateway's /metrics; None when absent."""
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mosmedai_feedback_total" and sample.labels == {
                    "tool": tool, "version": version, "region": region, "verdict": verdict}:
                return sample.value
    return None


def test_feedback_is_stored_answered_again_and_counted_once(moscow, study, store, platform_settings):
    uid = study["study_instance_uid"]
    result = next(entry for entry in study["tools"] if entry["tool"] == TOOL)
    assert result["model_version"] == "1"
    # The tool version's series exist from its first answer, at 0, so increase() sees the first feedback.
    assert feedback_count(moscow, TOOL, "1", "RU-MOW", "agree") == 0
    first = give(moscow, uid, comment="clear opacity, right lower zone")
    assert first.status_code == 201, first.text
    stored = first.json()
    assert {key: stored[key] for key in ("study_instance_uid", "tool", "model_version", "verdict", "reason",
                                         "reviewer", "comment", "result_positive")} == {
        "study_instance_uid": uid, "tool": TOOL, "model_version": "1", "verdict": "agree", "reason": None,
        "reviewer": "rad-001", "comment": "clear opacity, right lower zone",
        "result_positive": bool(result["findings"])}
    again = give(moscow, uid, comment="clear opacity, right lower zone")
    assert again.status_code == 200, again.text
    assert again.json() == stored  # the stored one, its time of receipt included
    assert feedback_count(moscow, TOOL, "1", "RU-MOW", "agree") == 1
    # Kept in the object store, under the tenant, where the next gateway finds it.
    key = feedback.record_key(MOSCOW, TOOL, uid, "rad-001")
    assert json.loads(store.get(platform_settings.results_bucket, key)) == stored


def test_a_different_verdict_from_the_same_reviewer_is_a_named_conflict(moscow, study):
    uid = study["study_instance_uid"]
    assert give(moscow, uid, tool="cxr_pneumothorax", reviewer="rad-002").status_code == 201
    before = feedback_count(moscow, "cxr_pneumothorax", "1", "RU-MOW", "disagree")
    changed = give(moscow, uid, tool="cxr_pneumothorax", reviewer="rad-002", verdict="disagree",
                   reason="false_negative")
    assert changed.status_code == 409, changed.text
    body = changed.json()
    assert body["error"] == "feedback_conflict"
    assert body["fields"] == ["verdict", "reason"]
    assert "verdict 'agree'" in body["detail"] and body["stored"]["verdict"] == "agree"
    assert feedback_count(moscow, "cxr_pneumothorax", "1", "RU-MOW", "disagree") == before
    # The first answer stands.
    assert give(moscow, uid, tool="cxr_pneumothorax", reviewer="rad-002").status_code == 200


def test_another_tenants_study_is_forbidden_exactly_like_an_unknown_one(moscow, tatarstan, study):
    uid = study["study_instance_uid"]
    unknown = "1.2.826.0.1.3680043.8.498.999999999999"
    theirs = give(tatarstan, uid, reviewer="kazan-rad-1")
    nothing = give(tatarstan, unknown, reviewer="kazan-rad-1")
    assert theirs.status_code == nothing.status_code == 403
    assert theirs.json() == {"error": "forbidden", "detail": f"no study {uid} is visible to tenant {TATARSTAN}"}
    assert json.dumps(nothing.json()).replace(unknown, uid) == json.dumps(theirs.json())
    # The tenant's own token on an unknown study, too.
    assert give(moscow, unknown).status_code == 403
    # Nor does the tool that ran tell anything: another tenant's study with a tool that did not run is 403 too.
    assert give(tatarstan, uid, tool="ctc_covid", reviewer="kazan-rad-1").status_code == 403


BAD = {
    "verdict not one of the three": ({"verdict": "maybe"}, 422, "invalid_feedback", ["verdict"]),
    "reason not one of the four": ({"verdict": "disagree", "reason": "looks_odd"}, 422, "invalid_feedback",
                                   ["reason"]),
    "disagree without a reason": ({"verdict": "disagree", "reason": None}, 422, "invalid_feedback", ["reason"]),
    "a reason with agree": ({"verdict": "agree", "reason": "false_positive"}, 422, "invalid_feedback", ["reason"]),
    "no reviewer": ({"reviewer": ""}, 422, "invalid_feedback", ["reviewer"]),
    "a field of no meaning": ({"score": 5}, 422, "invalid_feedback", ["score"]),
    "a tool not enabled": ({"tool": "cxr_unicorn"}, 422, "unknown_tool", ["tool"]),
    "a tool that did not run on the study": ({"tool": "ctc_covid"}, 422, "tool_not_run", ["tool"]),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_feedback_gets_a_422_naming_the_field(moscow, study, name):
    fields, status, code, named = BAD[name]
    answer = give(moscow, study["study_instance_uid"], **{"reviewer": "rad-bad", **fields})
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["error"] == code and body["fields"] == named
    assert f"'{named[0]}'" in body["detail"]


def test_a_body_that_is_not_json_or_a_bad_uid_is_refused(moscow, study):
    uid = study["study_instance_uid"]
    not_json = moscow.post(f"/v1/studies/{uid}/feedback", content=b"verdict=agree",
                           headers={"Content-Type": "application/json"})
    assert (not_json.status_code, not_json.json()["error"]) == (400, "not_json")
    form = moscow.post(f"/v1/studies/{uid}/feedback", data={"verdict": "agree"})
    assert (form.status_code, form.json()["error"]) == (415, "unsupported_media_type")
    bad_uid = give(moscow, "1.2.x")
    assert (bad_uid.status_code, bad_uid.json()["error"]) == (422, "invalid_uid")


def test_the_answered_study_is_recorded_under_its_tenant(study, store, platform_settings):
    uid = study["study_instance_uid"]
    deadline = time.monotonic() + 15
    while (data := store.get_optional(platform_settings.results_bucket, answered.record_key(MOSCOW, uid))) is None:
        assert time.monotonic() < deadline, "the answered study was not stored within 15 s"
        time.sleep(0.2)
    record = json.loads(data)
    assert record["tenant"] == MOSCOW and record["study_instance_uid"] == uid
    assert {tool: entry["model_version"] for tool, entry in record["tools"].items()} == {
        entry["tool"]: entry["model_version"] for entry in study["tools"]}
    assert {tool: entry["positive"] for tool, entry in record["tools"].items()} == {
        entry["tool"]: bool(entry["findings"]) for entry in study["tools"]}
    assert store.get_optional(platform_settings.results_bucket, answered.record_key(TATARSTAN, uid)) is None


def test_quality_counts_the_tenants_feedback_per_version(moscow, tatarstan, study):
    uid = study["study_instance_uid"]
    tool = "cxr_nodule"
    assert give(moscow, uid, tool=tool, reviewer="rad-a").status_code == 201
    assert give(moscow, uid, tool=tool, reviewer="rad-b", verdict="disagree",
                reason="false_negative").status_code == 201
    assert give(moscow, uid, tool=tool, reviewer="rad-c", verdict="image_defect").status_code == 201
    answer = moscow.get(f"/v1/tools/{tool}/quality")
    assert answer.status_code == 200, answer.text
    quality = answer.json()
    assert (quality["tool"], quality["tenant"], quality["region"]) == (tool, MOSCOW, "RU-MOW")
    assert quality["versions"] == [{
        "model_version": "1", "region": "RU-MOW", "shadow_agreement": None,
        "feedback": {"total": 3, "agree": 1, "disagree": 1, "image_defect": 1, "disagreement_rate": 0.5,
                     "reasons": {"false_positive": 0, "false_negative": 1, "wrong_location": 0,
                                 "wrong_measurement": 0}}}]
    assert "shadow runs" in quality["shadow_agreement_status"]  # none on this platform: null
    # Another tenant sees none of it.
    theirs = tatarstan.get(f"/v1/tools/{tool}/quality").json()
    assert (theirs["tenant"], theirs["region"], theirs["versions"]) == (TATARSTAN, "RU-TA", [])


def test_quality_of_an_unknown_tool_is_404(moscow):
    answer = moscow.get("/v1/tools/cxr_unicorn/quality")
    assert answer.status_code == 404
    assert answer.json()["error"] == "unknown_tool" and "cxr_unicorn" in answer.json()["detail"]


def test_feedback_on_an_asynchronous_study(tatarstan, moscow):
    phantom = make_phantom((TEST_SEED, 2), shape=(600, 500), findings=[])
    accepted = tatarstan.post("/v1/studies", content=dicom_bytes(phantom),
                              headers={**DICOM, "Prefer": "respond-async"})
    assert accepted.status_code == 202, accepted.text
    uid = accepted.json()["study_instance_uid"]
    deadline = time.monotonic() + 120
    while (status := tatarstan.get(f"/v1/studies/{uid}").json())["status"] != "done":
        assert status["status"] in ("accepted", "running") and time.monotonic() < deadline, status
        time.sleep(0.5)
    before = feedback_count(tatarstan, TOOL, "1", "RU-TA", "disagree") or 0
    given = give(tatarstan, uid, verdict="disagree", reason="false_negative", reviewer="kazan-rad-1")
    assert given.status_code == 201, given.text
    result = next(entry for entry in status["results"]["results"][0]["tools"] if entry["tool"] == TOOL)
    assert (given.json()["model_version"], given.json()["result_positive"]) == ("1", bool(result["findings"]))
    assert feedback_count(tatarstan, TOOL, "1", "RU-TA", "disagree") == before + 1
    assert give(moscow, uid).status_code == 403


def test_a_tool_that_read_a_later_asynchronous_part_of_the_study_can_be_judged(moscow):
    # One image answered synchronously by one tool only; another image of the same study
    # accepted asynchronously, which every chest tool reads.
    first = dicom_bytes(make_phantom((TEST_SEED, 3), shape=(600, 500), findings=[]))
    answer = moscow.post("/v1/studies", content=first, headers=DICOM, params={"tools": TOOL})
    assert answer.status_code == 200, answer.text
    uid = answer.json()["study_instance_uid"]
    not_run = give(moscow, uid, tool="cxr_nodule", reviewer="rad-mixed")
    assert (not_run.status_code, not_run.json()["error"]) == (422, "tool_not_run")
    assert f"tools that did: ['{TOOL}']" in not_run.json()["detail"]
    second = dicom_bytes(make_phantom((TEST_SEED, 4), shape=(600, 500), findings=[]), StudyInstanceUID=uid)
    accepted = moscow.post("/v1/studies", content=second, headers={**DICOM, "Prefer": "respond-async"})
    assert accepted.status_code == 202, accepted.text
    deadline = time.monotonic() + 120
    while (status := moscow.get(f"/v1/studies/{uid}").json())["status"] != "done":
        assert status["status"] in ("accepted", "running") and time.monotonic() < deadline, status
        time.sleep(0.5)
    given = give(moscow, uid, tool="cxr_nodule", reviewer="rad-mixed")
    assert given.status_code == 201, given.text
    assert give(moscow, uid, reviewer="rad-mixed").status_code == 201  # the synchronous tool's result still counts


def test_a_record_written_here_is_updated_in_one_request_and_another_writers_change_is_kept(tmp_path):
    """Two gateway replicas' record writers on one store: the one that wrote a study's record
    last updates it with one conditional write; a change by the other in between fails that
    write and is merged, not overwritten."""
    from mosmedai.jobs.storage import start_local_s3

    def result(tool: str) -> dict:
        return {"tool": tool, "model_version": "1", "findings": [], "measurements": []}

    with start_local_s3(data_dir=tmp_path) as server:
        stores = [ObjectStore.local(server.endpoint_url, buckets=["results"]) for _ in range(2)]
        stores[0].ensure_buckets()
        sent = []
        stores[0]._client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
        here, there = (answered.StudyRecords(store, "results") for store in stores)
        uid = "1.2.826.0.1.3680043.8.498.1"

        here.merge(MOSCOW, uid, answered.tools_of([result("cxr_opacity")]))
        here.merge(MOSCOW, uid, answered.tools_of([result("cxr_nodule")]))
        assert sent == ["PUT", "PUT"]  # a create, then one conditional write
        there.merge(MOSCOW, uid, answered.tools_of([result("cxr_pneumothorax")]))
        record = here.merge(MOSCOW, uid, answered.tools_of([result("flg_triage")]))
        assert sent == ["PUT", "PUT", "PUT", "GET", "PUT"]  # stale ETag refused, read, merged
        stored = here.get(MOSCOW, uid)
        assert set(stored["tools"]) == set(record["tools"]) == {"cxr_opacity", "cxr_nodule", "cxr_pneumothorax",
                                                                 "flg_triage"}
