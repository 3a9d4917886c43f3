"""The app factory and its lifespan: models load in the background so ``/healthz`` answers at
once; the store opens with the app and closes with it; shutdown drains."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service import __version__
from service.http import health, masks, models, segment, v2
from service.http.admission import ByteAdmission
from service.http.auth import OriginPolicy, require_configured_key
from service.http.connections import RequestLimit
from service.http.delivery import AnswerDelivery
from service.http.errors import install_error_handlers
from service.http.middleware import HeadAsGet, RequestMetrics
from service.http.state import Lifecycle, Services
from service.manager import ModelManager
from service.settings import Settings
from service.store import MaskStore, create_store

log = logging.getLogger("segserve.http")
STATIC_DIR = Path(__file__).parent.parent / "static"


def create_app(
    settings: Settings | None = None,
    manager: ModelManager | None = None,
    store: MaskStore | None = None,
) -> FastAPI:
    """Build the app; ``manager``/``store`` are made from ``settings`` unless given."""
    settings = settings or Settings()
    require_configured_key(settings)
    password = settings.mask_store_password

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services(
            settings=settings,
            manager=manager or ModelManager.from_settings(settings),
            store=store
            or create_store(
                settings.mask_store,
                settings.mask_store_max_bytes,
                settings.mask_ttl_s,
                password=password.get_secret_value() if password else None,
            ),
            pool=ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="segserve-io"),
            lifecycle=Lifecycle(),
            admission=ByteAdmission(settings.max_inflight_bytes),
        )
        app.state.services = services
        loading = asyncio.create_task(_load(services))
        try:
            yield
        finally:
            services.lifecycle.begin_drain()
            loading.cancel()
            await asyncio.to_thread(services.manager.stop, settings.drain_timeout_s)
            await services.store.close()
            services.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="segserve",
        version=__version__,
        summary="Semantic segmentation (SegFormer, SETR) on onnxruntime",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(AnswerDelivery, timeout_s=settings.answer_timeout_s)  # innermost
    app.add_middleware(HeadAsGet)  # metrics and the origin policy see HEAD
    app.add_middleware(RequestLimit, limit=settings.max_connections)
    app.add_middleware(OriginPolicy, allowed_origins=settings.cors_origins)  # on refusals too
    app.add_middleware(RequestMetrics)  # outermost: refused origins are counted too
    for feature in (health, models, segment, masks, v2):
        app.include_router(feature.router)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def _load(services: Services) -> None:
    """Load and warm every bundle off the event loop; the manager's state records a failure."""
    try:
        await services.in_pool(services.manager.load_all)
        log.info("models ready: %s", ", ".join(services.manager.names()))
    except Exception:
        log.exception("model loading failed")
