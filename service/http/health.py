"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from service import errors
from service.http.schemas import ReadyResponse
from service.http.state import ServicesDep
from service.manager import ModelsState

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (liveness); says nothing about models."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz(svc: ServicesDep) -> Response:
    """200 once every model is loaded and warmed and the mask store answers; 503 otherwise."""
    manager = svc.manager
    problems = []
    if svc.lifecycle.draining:
        problems.append("draining: shutting down")
    if manager.state is ModelsState.FAILED and manager.failure:
        problems.append(manager.failure)
    elif manager.state is not ModelsState.READY:
        problems.append(f"models are {manager.state.value}")
    try:
        await svc.store.check()
    except errors.StoreUnavailableError as exc:
        problems.append(f"mask store unavailable: {exc}")
    body = ReadyResponse(
        ready=not problems,
        draining=svc.lifecycle.draining,
        models=manager.names() if manager.ready else [],
        problems=problems,
    )
    return JSONResponse(body.model_dump(), status_code=503 if problems else 200)


@router.get("/metrics")
async def metrics() -> Response:
    """Prometheus text format: segserve_* plus process and platform collectors."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
