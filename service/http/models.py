"""What models this server serves."""

from __future__ import annotations

from fastapi import APIRouter

from service.http.errors import ERROR_RESPONSES
from service.http.schemas import ModelInfo
from service.http.state import Services, ServicesDep
from service.render import palette_version

router = APIRouter()


def model_info(svc: Services, name: str) -> ModelInfo:
    engine = svc.manager.get(name)
    meta = engine.bundle.metadata
    return ModelInfo(
        name=engine.name,
        default=engine.name == svc.manager.default_name,
        arch=meta.arch,
        variant=meta.variant,
        dataset=meta.dataset,
        trained=meta.trained,
        provider=engine.provider,
        postprocess=engine.postprocess,
        aligned_side=engine.aligned_side,
        precision=meta.precision,
        num_classes=meta.num_classes,
        classes=list(meta.classes),
        palette=list(meta.palette),
        palette_version=palette_version(meta.palette),
        test_config=meta.test_config.model_dump(),
    )


@router.get("/models", response_model=list[ModelInfo])
async def list_models(svc: ServicesDep) -> list[ModelInfo]:
    svc.manager.require_ready()
    return [model_info(svc, name) for name in svc.manager.names()]


@router.get("/models/{name}", response_model=ModelInfo, responses=ERROR_RESPONSES)
async def get_model(name: str, svc: ServicesDep) -> ModelInfo:
    svc.manager.require_ready()
    return model_info(svc, name)
