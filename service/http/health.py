"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from service import errors
from service.http.schemas import ReadyResponse
from service.http.state import Services, ServicesDep
from service.manager import ModelsState

router = APIRouter()
# Under the readiness probe's timeoutSeconds (3 s in deploy/kubernetes/deployment.yaml).
STORE_CHECK_TIMEOUT_S = 1.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (liveness); says nothing about models."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz(svc: ServicesDep) -> Response:
    """200 once every model is loaded and warmed, until draining; 503 otherwise.

    The mask store is reported (``store``) but does not decide readiness: while Redis is down a
    replica still serves image outputs, and only the calls that keep or fetch a mask answer 503
    ``store_unavailable``, so a Redis restart does not take every replica out of the Service.
    """
    manager = svc.manager
    problems = []
    if svc.lifecycle.draining:
        problems.append("draining: shutting down")
    if manager.state is ModelsState.FAILED and manager.failure:
        problems.append(manager.failure)
    elif manager.state is not ModelsState.READY:
        problems.append(f"models are {manager.state.value}")
    body = ReadyResponse(
        ready=not problems,
        draining=svc.lifecycle.draining,
        models=manager.names() if manager.ready else [],
        problems=problems,
        store=await _store_state(svc),
    )
    return JSONResponse(body.model_dump(), status_code=503 if problems else 200)


async def _store_state(svc: Services) -> str:
    """``ok`` or ``unavailable: why``, within a bound that keeps the probe's own timeout."""
    try:
        await asyncio.wait_for(svc.store.check(), STORE_CHECK_TIMEOUT_S)
    except errors.StoreUnavailableError as exc:
        return f"unavailable: {exc}"
    except TimeoutError:
        return f"unavailable: no answer within {STORE_CHECK_TIMEOUT_S:g} s"
    return "ok"


@router.get("/metrics")
async def metrics() -> Response:
    """Prometheus text format: segserve_* plus process and platform collectors."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
