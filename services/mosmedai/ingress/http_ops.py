"""Operations over HTTP: liveness and readiness probes, the gateway's Prometheus metrics, and the
router's pools and batch statistics (SREs, benchmarks)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mosmedai.ingress.auth import keep_going, studies_of
from mosmedai.results.schemas import ErrorBody, PoolsAnswer

router = APIRouter()

#: The client's connection is closed after a draining replica's refusal: its next request opens
#: one to a replica that is not draining (a keep-alive connection would come back here).
DRAINING_HEADERS = {"Retry-After": "1", "Connection": "close"}


@router.get("/healthz", summary="The gateway process is alive")
async def healthz() -> dict:
    return {"status": "alive"}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(studies_of(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def readiness(request: Request) -> JSONResponse:
    service = studies_of(request)
    keep_going()
    if service.draining():
        return JSONResponse({"error": "draining", "detail": "this gateway replica is shutting down"}, 503,
                            headers=DRAINING_HEADERS)
    ready, body = await service.readiness()
    return JSONResponse(body, 200 if ready else 503)


@router.get("/readyz", summary="Triton and every enabled tool are ready", responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> JSONResponse:
    return await readiness(request)


@router.get("/v1/pools", response_model=PoolsAnswer, summary="The Triton pools, their state and load",
            description="Any tenant's token; shows no tenant data. `endpoint` is the pool's gRPC host:port.")
async def pools(request: Request) -> dict:
    return {"pools": await studies_of(request).router.pools_info.remote()}


@router.get("/v1/router/batches", summary="Realised batch sizes per tool since the last reset")
async def router_batches(request: Request) -> dict:
    return await studies_of(request).router.batch_stats.remote()


@router.post("/v1/router/batches/reset", summary="Start counting batches afresh")
async def router_batches_reset(request: Request) -> dict:
    await studies_of(request).router.reset_stats.remote()
    return {"status": "reset"}
