"""The admission gate of tool versions (``mosmedai tools admit`` / ``history``,
``mosmedai.catalog.version_admission``).

Every model card declares thresholds the gate can read. A version without a model card,
without thresholds in it, or without a reference-set generator is refused before anything
is sent, naming what is missing, and the refusal is recorded (a real local S3 server). On
the real platform (Triton + Ray Serve, the session's `platform`) cxr_opacity version 2 is
loaded beside version 1 and put to the gate twice with the same held-out cases: once with
its own card (admitted), once with a test copy of the card that asks more than the model
scores (refused, exit status 1); `history` lists both, newest first. Nothing of ours is
mocked; the commands run as a user runs them, in a child process."""

import json
import os
import shutil
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx
import pytest

from mosmedai.config import REPO_ROOT
from mosmedai.jobs.storage import ObjectStore, start_local_s3
from mosmedai.ingress.tenants import auth_headers
from mosmedai.catalog.tools import BUILTIN_TOOLS, CATALOG
from mosmedai.catalog.version_admission import (ADMITTED, REFUSED, AdmissionRecords, Decision, Threshold, ThresholdError,
                                        is_admitted, latest_decision, parse_thresholds, preflight, replace_section,
                                        thresholds_section)

REPOSITORY = REPO_ROOT / "model_repository"
BUCKET = "mosmedai-results"
#: Reference cases of the platform runs: the first 24 held-out phantoms (15 with an opacity);
#: version 2 finds 14 of them (sensitivity 0.93), above its card's 0.85, below the test copy's 0.97.
N = 24
BYO_EXAMPLE = REPO_ROOT / "examples" / "byo-tool"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mosmedai.local.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# --- the cards' thresholds -----------------------------------------------------------------------
@pytest.mark.parametrize("tool,version", [(tool, version) for tool in sorted(BUILTIN_TOOLS)
                                          for version in CATALOG[tool].versions])
def test_every_card_declares_thresholds_below_its_own_figures(tool, version):
    pre = preflight(tool, version, REPOSITORY)
    assert pre.missing == [], pre.missing
    evaluation = json.loads((REPOSITORY / CATALOG[tool].ensemble(version) / "evaluation.json").read_text())
    assert pre.thresholds and pre.card_n == evaluation["n"]
    for threshold in pre.thresholds:
        value = evaluation[threshold.metric]
        assert threshold.passed(value), (tool, str(threshold), value)
        # a margin, not the figure itself: 0.05 below a rate, 30 % above an error
        if threshold.op == ">=":
            assert value - threshold.bound >= 0.05 - 1e-9, (tool, str(threshold), value)
        else:
            assert threshold.bound >= 1.3 * value - 1e-9, (tool, str(threshold), value)


def test_the_card_writer_keeps_the_thresholds(tmp_path):
    """Regenerating a card (python -m mosmedai_training cards) writes the same card."""
    from mosmedai_training.chest_xray import write_card

    folder = tmp_path / "cxr_opacity_v2"
    shutil.copytree(REPOSITORY / "cxr_opacity_v2", folder)
    for model in ("cxr_opacity_net", "cxr_opacity_post"):
        shutil.copytree(REPOSITORY / model, tmp_path / model)
    result = json.loads((folder / "evaluation.json").read_text())
    write_card("cxr_opacity", result, tmp_path)
    assert (folder / "MODEL_CARD.md").read_text() == (REPOSITORY / "cxr_opacity_v2" / "MODEL_CARD.md").read_text()


def test_thresholds_parse_and_name_a_bad_row():
    section = thresholds_section("cxr_opacity", 2, [Threshold("auc", ">=", 0.9), Threshold("mae_mm", "<=", 1.5)],
                                 {"auc": 0.98, "mae_mm": 1.0}, "Rule.")
    card = "# Model card\n\n## Task\n\nText.\n" + section
    assert parse_thresholds(card) == [Threshold("auc", ">=", 0.9), Threshold("mae_mm", "<=", 1.5)]
    assert replace_section(card, section) == card  # rewriting is idempotent
    assert replace_section("# Model card\n\n## Task\n\nText.\n", section) == card
    moved = replace_section(card + "\n## Later\n\nmore\n", section.replace("0.9", "0.8"))
    assert parse_thresholds(moved)[0].bound == 0.8 and moved.endswith("## Later\n\nmore\n")
    assert parse_thresholds("# Model card\n\n## Task\n") == []
    with pytest.raises(ThresholdError, match=r"card.md line 4: .*\| `auc` \| about 0.9 \|"):
        parse_thresholds("# c\n## Admission thresholds\n| metric | bound |\n| `auc` | about 0.9 |\n", "card.md")
    with pytest.raises(ThresholdError, match="no threshold rows"):
        parse_thresholds("# c\n## Admission thresholds\n\nnone yet\n## Next\n", "card.md")
    with pytest.raises(ThresholdError, match="'auc' has a bound already"):
        parse_thresholds("## Admission thresholds\n| `auc` | >= 0.9 | |\n| auc | >= 0.8 | |\n")
    assert not Threshold("auc", ">=", 0.9).passed(None) and not Threshold("auc", ">=", 0.9).passed(float("nan"))
    assert Threshold("mae_mm", "<=", 1.5).passed(1.5) and not Threshold("mae_mm", "<=", 1.5).passed(1.6)


# --- refusals before anything is sent -----------------------------------------------------------
@pytest.fixture(scope="module")
def local_s3():
    with start_local_s3() as server:
        store = ObjectStore.local(server.endpoint_url)
        store.ensure_buckets(BUCKET)
        yield store, {"MOSMEDAI_S3_PORT": str(urlparse(server.endpoint_url).port),
                      "MOSMEDAI_BIND_HOST": urlparse(server.endpoint_url).hostname}


#: A gateway that is not there: a refusal before sending must not need it.
NOWHERE = "http://127.0.0.1:9"


def test_a_version_without_a_model_card_or_thresholds_is_refused_naming_it(local_s3, tmp_path):
    store, env = local_s3
    answer = cli("tools", "admit", "cxr_opacity", "2", "--repository", str(tmp_path), "--url", NOWHERE, env=env)
    assert answer.returncode == 1, answer.stderr
    assert "REFUSED before sending anything" in answer.stdout
    assert f"model card: no {tmp_path / 'cxr_opacity_v2' / 'MODEL_CARD.md'}" in answer.stdout
    assert "reference set" not in answer.stdout  # the tool has one

    (tmp_path / "cxr_opacity_v2").mkdir()
    card = (REPOSITORY / "cxr_opacity_v2" / "MODEL_CARD.md").read_text()
    (tmp_path / "cxr_opacity_v2" / "MODEL_CARD.md").write_text(card.split("\n## Admission thresholds")[0])
    answer = cli("tools", "admit", "cxr_opacity", "2", "--repository", str(tmp_path), "--url", NOWHERE, env=env)
    assert answer.returncode == 1 and "has no '## Admission thresholds' section" in answer.stdout, answer.stdout

    decisions = AdmissionRecords(store, BUCKET).history("cxr_opacity", 2)
    assert [d.decision for d in decisions] == [REFUSED, REFUSED]
    assert "admission thresholds" in decisions[0].missing[0] and "model card" in decisions[1].missing[0]
    assert decisions[0].n == 0 and decisions[0].figures is None and decisions[0].model_card["sha256"]
    assert decisions[0].key.startswith("admissions/cxr_opacity/v2/")
    assert not is_admitted(store, "cxr_opacity", 2, BUCKET)
    history = cli("tools", "history", "cxr_opacity", env=env)
    assert history.returncode == 0
    lines = history.stdout.splitlines()
    assert "admission thresholds" in lines[1] and "model card" in lines[2], history.stdout


def test_a_tool_without_a_reference_set_is_refused_naming_it(local_s3, tmp_path):
    """A tool package has no held-out case generator; with no card either, both are named."""
    store, env = local_s3
    env = {**env, "MOSMEDAI_TOOL_PACKAGES": str(BYO_EXAMPLE)}
    answer = cli("tools", "admit", "demo_bright_spot", "1", "--repository", str(tmp_path), "--url", NOWHERE, env=env)
    assert answer.returncode == 1, answer.stderr
    assert "model card: no" in answer.stdout and "reference set: no held-out" in answer.stdout, answer.stdout

    # with a card and thresholds, the reference set alone is missing
    (tmp_path / "demo_bright_spot").mkdir()
    (tmp_path / "demo_bright_spot" / "MODEL_CARD.md").write_text(
        "# Model card: `demo_bright_spot`\n" + thresholds_section("demo_bright_spot", 1, [Threshold("auc", ">=", 0.8)],
                                                                  {}, "Set by hand."))
    answer = cli("tools", "admit", "demo_bright_spot", "1", "--repository", str(tmp_path), "--url", NOWHERE, env=env)
    assert answer.returncode == 1 and "model card" not in answer.stdout, answer.stdout
    assert ("reference set: no held-out case generator for demo_bright_spot (family 'package_demo_bright_spot' has "
            "no mosmedai_training.package_demo_bright_spot with cases() and score(); a tool package brings none)"
            in answer.stdout), answer.stdout
    decision = AdmissionRecords(store, BUCKET).latest("demo_bright_spot", 1)
    assert decision.decision == REFUSED and len(decision.missing) == 1 and decision.thresholds == [
        {"metric": "auc", "op": ">=", "bound": 0.8}]


def test_an_unknown_tool_or_version_is_an_error_and_nothing_is_recorded(local_s3):
    store, env = local_s3
    for args, named in ((("cxr_opacty", "2"), "unknown tool 'cxr_opacty'"),
                        (("cxr_opacity", "3"), "tool cxr_opacity has no version 3; its versions: [1, 2]"),
                        (("cxr_opacity", "2", "-n", "0"), "-n must be at least 1")):
        answer = cli("tools", "admit", *args, "--url", NOWHERE, env=env)
        assert answer.returncode == 2 and named in answer.stderr and "nothing recorded" in answer.stderr, answer
    assert store.list(BUCKET, "admissions/cxr_opacty/") == [] and store.list(BUCKET, "admissions/cxr_opacity/v3/") == []
    answer = cli("tools", "history", "cxr_opacty", env=env)
    assert answer.returncode == 2 and "unknown tool 'cxr_opacty'" in answer.stderr


def test_records_are_created_never_overwritten_and_the_latest_counts(local_s3):
    store, _ = local_s3
    records = AdmissionRecords(store, BUCKET)
    first = Decision("cxr_nodule", 1, ADMITTED, "ok", 1_700_000_000.0)
    second = Decision("cxr_nodule", 1, REFUSED, "worse", 1_700_000_000.0)  # the same second: its own key
    records.record(first)
    records.record(second)
    assert first.key != second.key and store.put(BUCKET, first.key, b"{}", if_none_match=True) is None
    assert {d.key for d in records.history("cxr_nodule", 1)} == {first.key, second.key}
    later = Decision("cxr_nodule", 1, ADMITTED, "again", 1_700_000_060.0)
    records.record(later)
    assert latest_decision(store, "cxr_nodule", 1, BUCKET).key == later.key
    assert is_admitted(store, "cxr_nodule", 1, BUCKET)
    assert latest_decision(store, "cxr_pneumothorax", 1, BUCKET) is None
    assert not is_admitted(store, "cxr_pneumothorax", 1, BUCKET)


# --- the real platform -------------------------------------------------------------------------
def test_the_versions_query_names_what_is_wrong(platform):
    from mosmedai.phantoms.chest_xray import dicom_bytes, make_phantom

    body = dicom_bytes(make_phantom((31, 7), findings=["cxr_opacity"]))
    with httpx.Client(base_url=platform["gateway"], timeout=120.0, headers=auth_headers()) as client:
        for versions, code, named in (("cxr_opacity:3", "unknown_version", "has no version 3; its versions: [1, 2]"),
                                      ("cxr_opacity", "bad_versions", "'cxr_opacity' is not TOOL:VERSION"),
                                      ("cxr_opacity:" + "9" * 5000, "bad_versions", "is not TOOL:VERSION"),
                                      ("cxr_opacty:2", "unknown_tool", "'cxr_opacty' is not enabled"),
                                      ("cxr_nodule:1", "bad_versions", "cxr_nodule is not among the tools")):
            answer = client.post("/v1/studies", content=body, params={"tools": "cxr_opacity", "versions": versions},
                                 headers={"Content-Type": "application/dicom"})
            assert answer.status_code == 422 and answer.json()["error"] == code, answer.text
            assert named in answer.json()["detail"], answer.text
        pinned = client.post("/v1/studies", content=body, params={"tools": "cxr_opacity", "versions": "cxr_opacity:1"},
                             headers={"Content-Type": "application/dicom"})
        assert pinned.status_code == 200 and pinned.json()["tools"][0]["model_version"] == "1", pinned.text
        # version 2 is in the catalog, but this platform has not loaded it: a clear 409, not a 503 to retry
        unloaded = client.post("/v1/studies", content=body, params={"versions": "cxr_opacity:2"},
                               headers={"Content-Type": "application/dicom"})
        assert unloaded.status_code == 409 and unloaded.json()["error"] == "version_not_loaded", unloaded.text
        assert "cxr_opacity version 2 (Triton ensemble cxr_opacity_v2) is not loaded" in unloaded.json()["detail"]


def test_a_version_the_platform_has_not_loaded_is_an_error(platform, platform_settings):
    """The session platform runs version 1 only: nothing is decided about version 2 there."""
    answer = cli("tools", "admit", "cxr_opacity", "2", "-n", "2", "--url", platform["gateway"],
                 env=platform_settings.as_env())
    assert answer.returncode == 2, answer.stdout + answer.stderr
    assert "cxr_opacity version 2 (Triton ensemble cxr_opacity_v2) is not ready on the platform" in answer.stderr
    assert "nothing recorded" in answer.stderr


@pytest.fixture
def version_2_loaded(platform):
    """cxr_opacity version 2's ensemble loaded into the session platform's Triton (explicit
    model control), beside version 1, as an operator does before admitting it; unloaded after."""
    triton = platform["triton_http"]
    loaded = httpx.post(f"{triton}/v2/repository/models/cxr_opacity_v2/load", timeout=180.0)
    assert loaded.status_code == 200, loaded.text
    try:
        yield
    finally:
        # the session platform runs version 1 only again (test_versions relies on it)
        unloaded = httpx.post(f"{triton}/v2/repository/models/cxr_opacity_v2/unload", timeout=60.0)
        assert unloaded.status_code == 200, unloaded.text
        deadline = time.monotonic() + 30
        while httpx.get(f"{triton}/v2/models/cxr_opacity_v2/ready", timeout=10.0).status_code == 200:
            assert time.monotonic() < deadline, "cxr_opacity_v2 is still loaded"
            time.sleep(0.2)


def test_admit_runs_the_reference_set_through_the_platform_and_keeps_each_decision(
        platform, platform_settings, version_2_loaded, tmp_path):
    env = platform_settings.as_env()
    store = ObjectStore.local(platform_settings.s3_endpoint)
    admitted = cli("tools", "admit", "cxr_opacity", "2", "-n", str(N), "--url", platform["gateway"], env=env)
    assert admitted.returncode == 0, admitted.stdout + admitted.stderr
    assert admitted.stdout.startswith(f"cxr_opacity version 2: ADMITTED ({N} cases of the held-out reference set, "
                                      "seed 3003"), admitted.stdout
    assert "sensitivity" in admitted.stdout and "FAIL" not in admitted.stdout
    decision = latest_decision(store, "cxr_opacity", 2, platform_settings.results_bucket)
    assert decision.admitted and decision.n == N and decision.seed == 3003
    assert {check["metric"] for check in decision.checks} == {"auc", "sensitivity", "specificity",
                                                             "localisation_hit_rate"}
    assert all(check["passed"] for check in decision.checks)
    assert decision.figures["sensitivity"] < 0.97, decision.figures  # what the refusal below relies on
    assert decision.model_card["path"] == str(REPOSITORY / "cxr_opacity_v2" / "MODEL_CARD.md")
    evaluation = json.loads((REPOSITORY / "cxr_opacity_v2" / "evaluation.json").read_text())
    assert decision.model_card["evaluated_model_sha256"] == evaluation["model_sha256"]
    assert decision.platform.rstrip("/") == platform["gateway"] and decision.operator and decision.seconds > 0
    assert is_admitted(store, "cxr_opacity", 2, platform_settings.results_bucket)

    # A test copy of the card that asks for more sensitivity than the model has: refused.
    folder = tmp_path / "cxr_opacity_v2"
    folder.mkdir()
    for name in ("MODEL_CARD.md", "evaluation.json"):
        shutil.copy(REPOSITORY / "cxr_opacity_v2" / name, folder / name)
    card = (folder / "MODEL_CARD.md").read_text()
    assert "| `sensitivity` | >= 0.85 |" in card
    (folder / "MODEL_CARD.md").write_text(card.replace("| `sensitivity` | >= 0.85 |", "| `sensitivity` | >= 0.97 |"))
    refused = cli("tools", "admit", "cxr_opacity", "2", "-n", str(N), "--url", platform["gateway"],
                  "--repository", str(tmp_path), env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stdout.startswith("cxr_opacity version 2: REFUSED"), refused.stdout
    failed = [line for line in refused.stdout.splitlines() if line.rstrip().endswith("FAIL")]
    assert len(failed) == 1 and ">= 0.97" in failed[0] and "sensitivity" in failed[0], refused.stdout
    latest = latest_decision(store, "cxr_opacity", 2, platform_settings.results_bucket)
    assert latest.decision == REFUSED and latest.figures == decision.figures  # the same cases, the same answers
    assert "sensitivity" in latest.reason and "needs >= 0.97" in latest.reason
    assert not is_admitted(store, "cxr_opacity", 2, platform_settings.results_bucket)  # the latest decision counts

    # The audit trail, newest first: the refusal, then the admission.
    history = cli("tools", "history", "cxr_opacity", "--version", "2", env=env)
    assert history.returncode == 0, history.stderr
    rows = history.stdout.splitlines()[1:]
    assert " refused " in rows[0] and " admitted " in rows[1], history.stdout
    as_json = json.loads(cli("tools", "history", "cxr_opacity", "--json", env=env).stdout)
    assert [(r["version"], r["decision"]) for r in as_json[:2]] == [(2, REFUSED), (2, ADMITTED)]
    assert as_json[0]["key"] == latest.key and as_json[1]["key"] == decision.key
    assert as_json[1]["figures"]["auc"] == decision.figures["auc"] and as_json[0]["decided_at_utc"].endswith("Z")
