"""Integrator paths that Locust drives, and the ones the platform does not have yet.

A path is one way an integrator sends work: the study API with DICOM of one modality, the
Open Inference Protocol with tensors, DICOMweb STOW-RS. Each path has a sender
``send(client)`` built lazily and cached (real-sized bodies are made once per Locust process,
never per request). A path the platform lacks (no tools of its modality, no endpoint) is
reported with the reason (``check_live``), so asking for one fails with that reason instead of
load-testing an endpoint that does not exist. Adding a path = one entry here and one sender.
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
    modalities: tuple[str, ...]  # the planner's modalities this path carries (config.DEFAULT_MIX names)
    description: str
    missing: str = ""  # why the platform cannot take it yet; empty = available
    tools: str = ""  # tool-name prefix the platform must serve for this path (checked live by `check_live`)
    endpoint: str = ""  # an endpoint that must exist (checked live by `check_live`)

    @property
    def available(self) -> bool:
        return not self.missing

    @property
    def modality(self) -> str:
        return self.modalities[0]


#: Real-ish sizes of the bodies (built once per Locust process): a 0.1 mm full-field digital
#: mammography detector (2294 x 1914, as GE's Senographe), a 96-slice chest CT of 512 x 512.
MG_SHAPE = (2294, 1914)
CT_SHAPE = (96, 512, 512)
CT_SPACING_MM = (2.5, 0.7, 0.7)

PATHS: dict[str, IntegratorPath] = {p.name: p for p in (
    IntegratorPath("study_cxr", ("chest_xray", "fluorography"),
                   "POST /v1/studies, one 2500x2048 DX chest radiograph (DICOM Part-10, uncompressed or RLE)",
                   tools="cxr_"),
    IntegratorPath("oip_cxr", ("chest_xray",),
                   "POST /v2/models/cxr_nodule/infer, Open Inference Protocol with binary tensors (512-px image)",
                   tools="cxr_nodule"),
    IntegratorPath("study_mg", ("mammography",),
                   f"POST /v1/studies, a 4-view mammography study (L/R x CC/MLO, {MG_SHAPE[0]}x{MG_SHAPE[1]}) "
                   "as one multipart/related body", tools="mg_"),
    IntegratorPath("study_ct", ("chest_ct",),
                   f"POST /v1/studies, a chest CT series ({CT_SHAPE[0]} slices of {CT_SHAPE[1]}x{CT_SHAPE[2]}) "
                   "as one multipart/related body", tools="ctc_"),
    IntegratorPath("stow_cxr", ("chest_xray",),
                   "POST /dicomweb/studies (DICOMweb STOW-RS, multipart/related), one DX chest radiograph; "
                   "answer 200 with the DICOM JSON Store Instances Response", endpoint="/dicomweb/studies"),
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


def unavailable_live(host: str, paths: list[IntegratorPath], timeout: float = 10.0) -> dict[str, str]:
    """Which of the paths the platform at ``host`` does not serve now, and why: a path's tools
    must be among /readyz's states, its endpoint must exist (a 404 means it does not)."""
    import httpx

    from mosmedai.ingress.tenants import auth_headers

    why: dict[str, str] = {}
    with httpx.Client(base_url=host, timeout=timeout, headers=auth_headers()) as client:
        states = None
        if any(p.tools for p in paths):
            try:
                states = client.get("/readyz").json().get("states")
            except (httpx.HTTPError, ValueError) as error:
                states = None
                print(f"mosmedai load: could not read {host}/readyz ({error}); tools not checked")
        for p in paths:
            if p.tools and isinstance(states, dict) and not any(t.startswith(p.tools) for t in states):
                why[p.name] = f"the platform at {host} serves no {p.tools}* tools (it serves {sorted(k for k in states if k != 'triton')})"
            if p.endpoint:
                try:
                    answer = client.post(p.endpoint, content=b"", headers={"Content-Type": "text/plain"})
                except httpx.HTTPError as error:
                    why[p.name] = f"{p.endpoint} did not answer ({error})"
                    continue
                if answer.status_code in (404, 405):
                    why[p.name] = f"the platform at {host} has no {p.endpoint} endpoint ({answer.status_code})"
    return why


def check_live(host: str, paths: list[IntegratorPath]) -> None:
    why = unavailable_live(host, paths)
    if why:
        raise PathUnavailable("paths the platform does not serve: " + "; ".join(f"{n}: {w}" for n, w in why.items()))


def day_weights(paths: list[IntegratorPath], mix=DEFAULT_MIX,
                fixed: dict[str, float] | None = None) -> tuple[list[float], list[str]]:
    """Request shares of the chosen paths from the modality mix, and the modalities left out (no path).

    A modality's share is split evenly among the paths that carry it (chest X-ray over study_cxr,
    oip_cxr and stow_cxr when all are chosen; fluorography goes to study_cxr). ``fixed``: paths
    given an explicit share of the requests; the others share the rest by the mix.
    """
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - {p.name for p in paths})
    if unknown:
        raise PathUnavailable(f"shares given for paths not chosen: {unknown}")
    if any(v < 0 for v in fixed.values()) or sum(fixed.values()) > 1 + 1e-9:
        raise PathUnavailable(f"fixed path shares must be non-negative and sum to at most 1, got {fixed}")
    share = {m.name: m.share for m in mix}
    carriers: dict[str, list[IntegratorPath]] = {}
    for p in paths:
        if p.name not in fixed:
            for m in p.modalities:
                carriers.setdefault(m, []).append(p)
    weights = [0.0] * len(paths)
    for m, carried_by in carriers.items():
        for p in carried_by:
            weights[paths.index(p)] += share.get(m, 0.0) / len(carried_by)
    free = [i for i, p in enumerate(paths) if p.name not in fixed]
    total_free = sum(weights[i] for i in free)
    if free and total_free <= 0:
        for i in free:
            weights[i] = 1.0
        total_free = float(len(free))
    rest = 1.0 - sum(fixed.values()) if free else 0.0
    out = [fixed[p.name] if p.name in fixed else rest * weights[i] / total_free for i, p in enumerate(paths)]
    if sum(out) <= 0:
        raise PathUnavailable("the chosen paths get no requests (all shares are 0)")
    dropped = sorted(set(share) - {m for p in paths for m in p.modalities})
    total = sum(out)
    return [w / total for w in out], dropped


def rate_at(t: float, *, day_seconds: float, peak_rps: float, start_hour: float = 0.0,
            curve=DEFAULT_WEEKDAY_CURVE) -> float:
    """Requests/s at run time t when a region's working day is replayed in ``day_seconds``."""
    hour = (start_hour + 24.0 * t / day_seconds) % 24.0
    return peak_rps * curve[int(hour)] / max(curve)


# --- senders -------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def study_body(syntax: str = "uncompressed") -> bytes:
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    from mosmedai.phantoms.dicom_build import to_bytes
    from mosmedai.phantoms.chest_xray import make_phantom, to_dataset

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


@lru_cache(maxsize=2)
def mammography_study(seed: int = 5_000_002, shape: tuple[int, int] = MG_SHAPE) -> tuple[bytes, str]:
    """A 4-view screening mammography study (L CC, R CC, L MLO, R MLO; one Study Instance UID,
    a series per view) as one multipart/related body, and its Content-Type."""
    from pydicom.uid import generate_uid

    from mosmedai.phantoms.dicom_build import to_bytes
    from mosmedai.phantoms.mammography import make_phantom, to_dataset
    from mosmedai.pipeline.multipart import multipart_body

    study = generate_uid()
    payloads = []
    for number, (laterality, view) in enumerate((("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")), start=1):
        phantom = make_phantom((seed, number), shape=shape, laterality=laterality, view=view)
        payloads.append(to_bytes(to_dataset(phantom, StudyInstanceUID=study, SeriesNumber=number, InstanceNumber=1,
                                            PatientID=f"LOAD-{seed}", PatientName=f"LOAD^{seed}",
                                            StudyDescription="MAMMO SCREENING (load test)")))
    return multipart_body(payloads)


@lru_cache(maxsize=2)
def ct_study(seed: int = 5_000_003, shape: tuple[int, int, int] = CT_SHAPE,
             spacing_mm: tuple[float, float, float] = CT_SPACING_MM, chunk: int = 16) -> tuple[bytes, str]:
    """A chest CT series (``shape`` slices x rows x columns in HU from the chest phantom) as one
    multipart/related body, and its Content-Type. Rendered ``chunk`` slices at a time (memory)."""
    from mosmedai.phantoms.ct_chest import make_phantom
    from mosmedai.phantoms.dicom_build import ct_series, to_bytes
    from mosmedai.pipeline.multipart import multipart_body

    phantom = make_phantom(seed, shape=shape, spacing_mm=spacing_mm)
    hu = np.empty(shape, np.float32)
    for first in range(0, shape[0], chunk):
        zi = np.arange(first, min(first + chunk, shape[0]))
        hu[zi] = phantom.render(zi=zi)[0]
    datasets = ct_series(hu, spacing_mm, series_description="CHEST CT (load test)",
                         PatientID=f"LOAD-{seed}", PatientName=f"LOAD^{seed}")
    del hu
    return multipart_body([to_bytes(ds) for ds in datasets])


@lru_cache(maxsize=2)
def stow_body(syntax: str = "uncompressed") -> tuple[bytes, str]:
    from mosmedai.pipeline.multipart import multipart_body

    return multipart_body([study_body(syntax)])


def _poster(url: str, body: bytes, headers: dict, name: str, check: Callable | None = None) -> Callable:
    def send(client):
        with client.post(url, data=body, headers=headers, name=name, catch_response=True) as answer:
            if answer.status_code != 200:
                answer.failure(f"{answer.status_code}: {answer.text[:200]}")
            elif check is not None:
                problem = check(answer)
                if problem:
                    answer.failure(problem)
    return send


def _results_of(count: int) -> Callable:
    def check(answer) -> str:
        try:
            results = answer.json().get("results")
        except ValueError:
            return "answer is not JSON"
        if not isinstance(results, list) or len(results) < count:
            return f"expected at least {count} results, got {0 if not isinstance(results, list) else len(results)}"
        return ""
    return check


def _stow_stored(answer) -> str:
    try:
        response = answer.json()
    except ValueError:
        return "answer is not DICOM JSON"
    if "00081198" in response:  # Failed SOP Sequence
        return f"instances failed: {str(response['00081198'])[:200]}"
    if "00081199" not in response:  # Referenced SOP Sequence
        return "no Referenced SOP Sequence in the STOW-RS response"
    return ""


def build_bodies(paths: list[IntegratorPath], syntax: str = "uncompressed") -> None:
    """Build (and cache) every body the paths send: once per Locust process, before the run."""
    for path in paths:
        sender(path, syntax)


@lru_cache(maxsize=16)
def sender(path: IntegratorPath, syntax: str = "uncompressed") -> Callable:
    from mosmedai.ingress.tenants import auth_headers

    auth = auth_headers()
    if path.name == "study_cxr":
        body = study_body(syntax)

        def send(client):
            with client.post("/v1/studies", data=body, headers={"Content-Type": "application/dicom", **auth},
                             name="study_cxr", catch_response=True) as answer:
                if answer.status_code != 200:
                    answer.failure(f"{answer.status_code}: {answer.text[:200]}")
        return send
    if path.name == "oip_cxr":
        body, json_size = oip_body()
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size),
                   **auth}

        def send(client):
            with client.post("/v2/models/cxr_nodule/infer", data=body, headers=headers, name="oip_cxr",
                             catch_response=True) as answer:
                if answer.status_code != 200:
                    answer.failure(f"{answer.status_code}: {answer.text[:200]}")
                elif b'"probability"' not in answer.content[:4096]:
                    answer.failure("no probability output")
        return send
    if path.name == "study_mg":
        body, content_type = mammography_study()
        return _poster("/v1/studies", body, {"Content-Type": content_type, **auth}, "study_mg", _results_of(4))
    if path.name == "study_ct":
        body, content_type = ct_study()
        return _poster("/v1/studies", body, {"Content-Type": content_type, **auth}, "study_ct", _results_of(1))
    if path.name == "stow_cxr":
        body, content_type = stow_body(syntax)
        return _poster("/dicomweb/studies", body, {"Content-Type": content_type, "Accept": "application/dicom+json",
                                                   **auth}, "stow_cxr", _stow_stored)
    raise PathUnavailable(f"{path.name}: {path.missing or 'no sender'}")
