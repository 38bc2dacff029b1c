"""The Open Inference Protocol (KServe v2) over REST: raw tensors passed to Triton unchanged,
so a stock ``tritonclient.http`` client works, binary tensors included. Only the caller's
enabled tools are reachable, at their live version; a named version is its own ensemble."""

from __future__ import annotations

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mosmedai import __version__
from mosmedai.catalog.tools import CATALOG
from mosmedai.ingress.auth import studies_of, tenant_of
from mosmedai.ingress.http_ops import readiness

router = APIRouter()


async def _to_triton(request: Request, path: str) -> Response:
    # The body goes on as it came (compressed or not); answers come back uncompressed
    # (httpx decodes them), so Accept-Encoding is not passed on.
    headers = {key: value for key, value in request.headers.items()
               if key.lower() in ("content-type", "inference-header-content-length", "content-encoding")}
    try:
        answer = await studies_of(request).triton.request(request.method, path, content=await request.body(),
                                                          headers=headers, params=request.query_params)
    except httpx.HTTPError as error:
        return JSONResponse({"error": f"Triton unreachable: {error}"}, status_code=503)
    passed = {key: value for key, value in answer.headers.items()
              if key.lower() in ("content-type", "inference-header-content-length")}
    return Response(answer.content, status_code=answer.status_code, headers=passed)


def _unknown(tool: str, request: Request) -> JSONResponse | None:
    enabled = studies_of(request).view(tenant_of(request)).enabled
    if tool not in enabled:
        # KServe v2 error body: {"error": "..."}.
        return JSONResponse({"error": f"unknown model '{tool}'; enabled: {list(enabled)}"}, 404)
    return None


def _live_ensemble(tool: str, request: Request) -> str:
    return CATALOG[tool].ensemble(studies_of(request).view(tenant_of(request)).version(tool))


@router.get("/v2", summary="OIP server metadata")
async def oip_server() -> dict:
    return {"name": "mosmedai", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live", summary="OIP server live")
async def oip_live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready", summary="OIP server ready")
async def oip_ready(request: Request) -> Response:
    return Response(status_code=(await readiness(request)).status_code)


@router.api_route("/v2/models/{tool}", methods=["GET"], summary="OIP model metadata")
async def oip_model(tool: str, request: Request) -> Response:
    return _unknown(tool, request) or await _to_triton(request, f"/v2/models/{_live_ensemble(tool, request)}")


@router.api_route("/v2/models/{tool}/{action}", methods=["GET", "POST"], summary="OIP model ready / config / infer")
async def oip_action(tool: str, action: str, request: Request) -> Response:
    if action not in ("ready", "config", "infer", "stats"):
        return JSONResponse({"error": f"unknown endpoint '{action}'"}, 404)
    return _unknown(tool, request) or await _to_triton(
        request, f"/v2/models/{_live_ensemble(tool, request)}/{action}")


@router.api_route("/v2/models/{tool}/versions/{version}/{action}", methods=["GET", "POST"],
                  summary="OIP versioned model ready / infer")
async def oip_versioned(tool: str, version: str, action: str, request: Request) -> Response:
    if action not in ("ready", "config", "infer") or not (version.isascii() and version.isdigit()):
        return JSONResponse({"error": f"unknown endpoint '{version}/{action}'"}, 404)
    refused = _unknown(tool, request)
    if refused:
        return refused
    if int(version) not in CATALOG[tool].versions:
        return JSONResponse({"error": f"model '{tool}' has no version {version}; versions: "
                             f"{list(CATALOG[tool].versions)}"}, 404)
    # a tool version is its own ensemble (ToolSpec.ensemble), whose Triton version is 1
    return await _to_triton(request, f"/v2/models/{CATALOG[tool].ensemble(int(version))}/versions/1/{action}")
