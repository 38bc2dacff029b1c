"""Every tool, loaded in the real Triton behind the real gateway, on fresh phantoms.

For each tool: phantoms from its family's generator (TEST_SEED, never trained or
calibrated on) go through `POST /v1/studies` as a hospital would send them (one file, or
a CT series as multipart/related); the served outputs are scored by the family's own
`score()` and must agree with the model card (`evaluation.json`) within the family's
stated TOLERANCE - which also means drawn findings are found and clean images stay quiet.
"""

import importlib
import json
import math
import uuid

import httpx
import numpy as np
import pytest

from mosmedai.config import REPO_ROOT
from mosmedai.phantoms.dicom_build import to_bytes
from mosmedai.catalog.families import IMAGE, ToolOutput
from mosmedai.catalog.tools import CATALOG
from mosmedai.ingress.tenants import auth_headers
from mosmedai.phantoms import TEST_SEED

#: Cases per tool: enough for the tolerances the families state, few enough for CI.
CASES = {"image": 20, "volume": 12}


def multipart(datasets) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks = []
    for dataset in datasets:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), to_bytes(dataset), b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def served_output(tool_result: dict) -> ToolOutput:
    """The API's JSON for one tool -> the ToolOutput its family's score() reads."""
    probability = tool_result["scores"].get("probability", math.nan)
    location = np.full(4, -1.0, np.float32)
    if tool_result["findings"] and tool_result["findings"][0]["location"]:
        box = tool_result["findings"][0]["location"]
        location = np.array([box["row0"], box["col0"], box["row1"], box["col1"]], np.float32)
    measurements = [math.nan if m["value"] is None else m["value"] for m in tool_result["measurements"]]
    return ToolOutput(probability, bool(tool_result["findings"]), location, np.array(measurements, np.float32))


@pytest.fixture(scope="module")
def gateway(platform):
    with httpx.Client(base_url=platform["gateway"], timeout=300.0, headers=auth_headers()) as client:
        yield client


@pytest.mark.parametrize("tool", sorted(CATALOG))
def test_tool_agrees_with_its_model_card(gateway, tool):
    spec = CATALOG[tool]
    module = importlib.import_module(f"mosmedai_training.{spec.family.name}")
    cases = module.cases(tool, TEST_SEED, CASES[spec.kind])
    outputs = []
    for case in cases:
        if spec.kind == IMAGE:
            (dataset,) = case.instances
            answer = gateway.post("/v1/studies", content=to_bytes(dataset), params={"tools": tool},
                                  headers={"Content-Type": "application/dicom"})
            assert answer.status_code == 200, answer.text
            results = answer.json()["tools"]
        else:
            body, content_type = multipart(case.instances)
            answer = gateway.post("/v1/studies", content=body, params={"tools": tool},
                                  headers={"Content-Type": content_type})
            assert answer.status_code == 200, answer.text
            (item,) = answer.json()["results"]
            assert item["kind"] == "volume" and len(item["sop_instance_uids"]) == len(case.instances)
            results = item["tools"]
        (result,) = [r for r in results if r["tool"] == tool]
        outputs.append(served_output(result))

    served = module.score(tool, outputs, cases)
    card = json.loads((REPO_ROOT / "model_repository" / tool / "evaluation.json").read_text())
    for metric, tolerance in module.TOLERANCE.items():
        if served.get(metric) is None or card.get(metric) is None:
            continue  # e.g. no true positive among the few cases to locate
        assert abs(served[metric] - card[metric]) <= tolerance, (
            f"{tool}: {metric} served {served[metric]:.3f} vs card {card[metric]:.3f} (tolerance {tolerance})")
