"""Integrator paths that Locust drives, and the ones the platform does not have yet.

A path is one way an integrator sends work: the study API with DICOM of one modality, the
Open Inference Protocol with tensors, DICOMweb STOW-RS. Each available path has a sender
``send(client)`` built lazily (real-sized bodies are made once per Locust process). Paths the
platform lacks are listed with the reason, so asking for one fails with that reason instead
of load-testing an endpoint that does not exist. Adding a path = one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from mosmedai_load.config import DEFAULT_MIX, DEFAULT_WEEKDAY_CURVE


class PathUnavailable(ValueError):
    pass


@dataclass(frozen=True)
class IntegratorPath:
    name: str
    modality: str  # the planner's modality this path carries (config.DEFAULT_MIX names)
    description: str
    missing: str = ""  # why the platform cannot take it yet; empty = available

    @property
    def available(self) -> bool:
        return not self.missing


PATHS: dict[str, IntegratorPath] = {p.name: p for p in (
    IntegratorPath("study_cxr", "chest_xray",
                   "POST /v1/studies, one 2500x2048 DX chest radiograph (DICOM Part-10, uncompressed or RLE)"),
    IntegratorPath("oip_cxr", "chest_xray",
                   "POST /v2/models/cxr_nodule/infer, Open Inference Protocol with binary tensors (512-px image)"),
    IntegratorPath("study_mammography", "mammography", "POST /v1/studies, a 4-view mammography study",
                   missing="the platform has no mammography tools (mg_*) and the study API takes one image per request"),
    IntegratorPath("study_ct_series", "chest_ct", "POST /v1/studies, a chest CT series",
                   missing="the platform has no CT tools (ctc_*, ctb_*) and no multi-instance study upload"),
    IntegratorPath("stow_rs", "chest_xray", "POST /studies (DICOMweb STOW-RS, multipart/related)",
                   missing="the gateway has no DICOMweb STOW-RS endpoint yet"),
)}


def resolve(names: list[str]) -> list[IntegratorPath]:
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise PathUnavailable(f"unknown paths {unknown}; known: {sorted(PATHS)}")
    missing = [f"{n}: {PATHS[n].missing}" for n in names if not PATHS[n].available]
    if missing:
        raise PathUnavailable("paths the platform does not serve yet: " + "; ".join(missing))
    if not names:
        raise PathUnavailable("no paths chosen")
    return [PATHS[n] for n in names]


def day_weights(paths: list[IntegratorPath], mix=DEFAULT_MIX) -> tuple[list[float], list[str]]:
    """Weights of the chosen paths from the modality mix, and the modalities left out (no path yet)."""
    share = {m.name: m.share for m in mix}
    weights = [share.get(p.modality, 0.0) for p in paths]
    per_modality: dict[str, int] = {}
    for p in paths:
        per_modality[p.modality] = per_modality.get(p.modality, 0) + 1
    weights = [w / per_modality[p.modality] for w, p in zip(weights, paths)]
    if sum(weights) <= 0:
        weights = [1.0] * len(paths)
    dropped = sorted(set(share) - {p.modality for p in paths})
    total = sum(weights)
    return [w / total for w in weights], dropped


def rate_at(t: float, *, day_seconds: float, peak_rps: float, start_hour: float = 0.0,
            curve=DEFAULT_WEEKDAY_CURVE) -> float:
    """Requests/s at run time t when a region's working day is replayed in ``day_seconds``."""
    hour = (start_hour + 24.0 * t / day_seconds) % 24.0
    return peak_rps * curve[int(hour)] / max(curve)


# --- senders -------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def study_body(syntax: str = "uncompressed") -> bytes:
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    from mosmedai.dicom_build import to_bytes
    from mosmedai.training.phantoms import make_phantom, to_dataset

    uid = {"uncompressed": ExplicitVRLittleEndian, "rle": RLELossless}[syntax]
    return to_bytes(to_dataset(make_phantom((5_000_001, 1), shape=(2500, 2048), findings=["cxr_nodule"])), uid)


@lru_cache(maxsize=2)
def oip_body(tool: str = "cxr_nodule") -> tuple[bytes, int]:
    """An Open Inference Protocol request with binary tensors (the binary data extension)."""
    import tritonclient.http as http

    from mosmedai_load.profile import tensors_for

    pixels, params, voi = tensors_for(study_body())
    inputs = []
    for name, array, dtype in (("pixels", pixels, "UINT16"), ("params", params, "FP32"), ("voi_lut", voi, "FP32")):
        tensor = http.InferInput(name, [1, *array.shape], dtype)
        tensor.set_data_from_numpy(np.ascontiguousarray(array[None]), binary_data=True)
        inputs.append(tensor)
    outputs = [http.InferRequestedOutput("probability", binary_data=False)]
    body, json_size = http.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    return body, json_size


def sender(path: IntegratorPath, syntax: str = "uncompressed") -> Callable:
    if path.name == "study_cxr":
        body = study_body(syntax)

        def send(client):
            with client.post("/v1/studies", data=body, headers={"Content-Type": "application/dicom"},
                             name="study_cxr", catch_response=True) as answer:
                if answer.status_code != 200:
                    answer.failure(f"{answer.status_code}: {answer.text[:200]}")
        return send
    if path.name == "oip_cxr":
        body, json_size = oip_body()
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}

        def send(client):
            with client.post("/v2/models/cxr_nodule/infer", data=body, headers=headers, name="oip_cxr",
                             catch_response=True) as answer:
                if answer.status_code != 200:
                    answer.failure(f"{answer.status_code}: {answer.text[:200]}")
                elif b'"probability"' not in answer.content[:4096]:
                    answer.failure("no probability output")
        return send
    raise PathUnavailable(f"{path.name}: {path.missing or 'no sender'}")
