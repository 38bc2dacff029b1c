"""The run of the admission gate (``mosmedai tools admit``): a tool version's held-out cases go
through the real platform, and the figures they earn decide whether it may go live.

The tool family's held-out cases (``cases()`` of its reference evaluation, with
``HELD_OUT_SEED``, as the evaluation uses) go through ``POST /v1/studies`` pinned to the version
(``versions=tool:N``), the family's own ``score()`` measures the answers, and every figure is
compared with the bound its model card declares. The decision is recorded
(``mosmedai.catalog.version_admission.AdmissionRecords``) either way.
"""

from __future__ import annotations

import getpass
import itertools
import math
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np

from mosmedai.catalog.families import ToolOutput
from mosmedai.catalog.tools import CATALOG
from mosmedai.catalog.version_admission import (
    ADMITTED,
    DEFAULT_N,
    REFUSED,
    RETRIES,
    AdmissionError,
    AdmissionRecords,
    Decision,
    Preflight,
    preflight,
)
from mosmedai.phantoms import HELD_OUT_SEED
from mosmedai.phantoms.dicom_build import to_bytes
from mosmedai.pipeline.multipart import multipart_body


def served_output(tool_result: dict):
    """The API's JSON for one tool -> the ToolOutput its family's score() reads."""
    probability = tool_result["scores"].get("probability", math.nan)
    probability = math.nan if probability is None else probability
    location = np.full(4, -1.0, np.float32)
    if tool_result["findings"] and tool_result["findings"][0].get("location"):
        box = tool_result["findings"][0]["location"]
        location = np.array([box["row0"], box["col0"], box["row1"], box["col1"]], np.float32)
    measurements = [math.nan if m["value"] is None else m["value"] for m in tool_result["measurements"]]
    return ToolOutput(probability, bool(tool_result["findings"]), location, np.array(measurements, np.float32))


def _request(case) -> tuple[bytes, str]:
    if len(case.instances) == 1:
        return to_bytes(case.instances[0]), "application/dicom"
    return multipart_body([to_bytes(dataset) for dataset in case.instances])


def _tool_result(answer: dict, tool: str) -> dict:
    """The tool's entry in a StudyResult (one image) or StudyResults (a series: one item)."""
    groups = [answer["tools"]] if "tools" in answer else [item["tools"] for item in answer["results"]]
    found = [result for tools in groups for result in tools if result["tool"] == tool]
    if len(found) != 1:
        raise AdmissionError(f"the platform answered {len(found)} results of {tool} for one case")
    return found[0]


def run_case(client, tool: str, version: int, case, sleep: Callable[[float], None] = time.sleep) -> dict:
    """One case through ``POST /v1/studies`` pinned to the version; the tool's JSON result."""
    body, content_type = _request(case)
    for attempt in range(RETRIES + 1):
        try:
            answer = client.post("/v1/studies", content=body, params={"tools": tool, "versions": f"{tool}:{version}"},
                                 headers={"Content-Type": content_type})
        except httpx.HTTPError as error:
            raise AdmissionError(f"the platform at {client.base_url} did not answer: {error}") from None
        if answer.status_code in (429, 503, 504) and attempt < RETRIES:
            sleep(min(10.0, float(answer.headers.get("retry-after", 1) or 1)))
            continue
        if answer.status_code != 200:
            raise AdmissionError(f"the platform answered HTTP {answer.status_code} for a case: {answer.text[:500]}")
        result = _tool_result(answer.json(), tool)
        if str(result.get("model_version")) != str(version):
            raise AdmissionError(f"asked for {tool} version {version}, the platform answered with version "
                                 f"{result.get('model_version')!r}")
        return result
    raise AssertionError("unreachable")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _operator() -> tuple[str, str]:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd entry)
        user = "unknown"
    return user, socket.gethostname()


def refusal_before_sending(pre: Preflight, platform: str, clock: Callable[[], float] = time.time) -> Decision:
    user, host = _operator()
    return Decision(
        pre.tool, pre.version, REFUSED, "missing " + "; ".join(pre.missing), clock(), missing=list(pre.missing),
        thresholds=[asdict(t) for t in pre.thresholds] or None,
        model_card=pre.card(),
        platform=platform, operator=user, host=host)


def admit(tool: str, version: int, client, records: AdmissionRecords, repository: Path, n: int | None = None,
          concurrency: int = 2, progress: Callable[[int, int], None] | None = None,
          clock: Callable[[], float] = time.time) -> Decision:
    """Put one tool version to the gate through the platform ``client`` (an httpx.Client with
    the gateway's base URL and a tenant's token) and record the decision. Raises
    AdmissionError when nothing could be decided."""
    if n is not None and n < 1:
        raise AdmissionError(f"-n must be at least 1, not {n}")
    pre = preflight(tool, version, repository)
    platform = str(client.base_url)
    if pre.missing:
        decision = refusal_before_sending(pre, platform, clock)
        records.record(decision)
        return decision
    n = n or pre.card_n or DEFAULT_N
    ready = client.get(f"/v2/models/{tool}/versions/{version}/ready")
    if ready.status_code != 200:
        said = f": {ready.text.strip()[:200]}" if ready.text.strip() else ""
        raise AdmissionError(
            f"{tool} version {version} (Triton ensemble {CATALOG[tool].ensemble(version)}) is not ready on the "
            f"platform at {platform} (HTTP {ready.status_code}{said}): enable the tool and load the version's "
            "ensemble in the pool's Triton first")
    started = clock()
    cases = pre.module.cases(tool, HELD_OUT_SEED, n)
    answered = itertools.count(1)  # next() is atomic under the GIL: a progress counter for the threads

    def one(case):
        result = run_case(client, tool, version, case)
        if progress is not None:
            progress(next(answered), len(cases))
        return served_output(result)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        outputs = list(pool.map(one, cases))
    figures = _jsonable(pre.module.score(tool, outputs, cases))
    checks = []
    for threshold in pre.thresholds:
        value = figures.get(threshold.metric)
        value = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        checks.append({**asdict(threshold), "value": value, "passed": threshold.passed(value)})
    failed = [check for check in checks if not check["passed"]]
    if failed:
        reason = "below its thresholds: " + "; ".join(
            f"{c['metric']} {'not measured' if c['value'] is None else format(c['value'], '.4g')} "
            f"(needs {c['op']} {c['bound']:g})" for c in failed)
    else:
        reason = f"every figure clears its threshold ({len(checks)} checked)"
    user, host = _operator()
    decision = Decision(
        tool, version, REFUSED if failed else ADMITTED, reason, clock(), n=len(cases), seed=HELD_OUT_SEED,
        reference_set=f"{pre.module.__name__}.cases({tool!r}, seed={HELD_OUT_SEED}, n={len(cases)})",
        figures=figures, thresholds=[asdict(t) for t in pre.thresholds], checks=checks,
        model_card=pre.card(), platform=platform,
        operator=user, host=host, seconds=round(clock() - started, 1))
    records.record(decision)
    return decision
