"""The HTTP face of segserve: routes that only translate HTTP to engine calls and back.

Everything heavy happens elsewhere: decoding and rendering in a small thread pool
(``imageio``/``render``), inference in the engine's batcher, results in the mask store. This module
owns the typed request/response models, the one table from typed failures to HTTP statuses, the
API key check, request metrics, the lifespan (load models, open the store) and the draining state
that graceful shutdown flips.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors
from service.bundle import BundleMetadata
from service.engine import Engine, EngineConfig, ModelManager, SegmentOptions, SegmentResult
from service.imageio import decode_image, encode_jpeg
from service.metrics import REQUEST_LATENCY, REQUESTS, STAGE_LATENCY
from service.render import (
    class_statistics,
    palette_array,
    palette_version,
    render_color_png,
    render_labels_png,
    render_overlay_png,
)
from service.settings import Settings
from service.store import MaskStore, StoredMask, create_store

log = logging.getLogger("segserve.api")
STATIC_DIR = Path(__file__).parent / "static"
PNG = "image/png"
T = TypeVar("T")

# The one table from typed failures to HTTP statuses (and the short code clients can switch on).
ERROR_STATUS: dict[type[errors.SegserveError], tuple[int, str]] = {
    errors.UnsupportedMediaError: (415, "unsupported_media"),
    errors.InvalidImageError: (400, "invalid_image"),
    errors.PayloadTooLargeError: (413, "payload_too_large"),
    errors.UnknownModelError: (404, "unknown_model"),
    errors.InvalidParameterError: (422, "invalid_parameter"),
    errors.MaskNotFoundError: (404, "mask_not_found"),
    errors.OverloadedError: (503, "overloaded"),
    errors.StoreUnavailableError: (503, "store_unavailable"),
    errors.InferenceTimeoutError: (504, "inference_timeout"),
    errors.UnauthorizedError: (401, "unauthorized"),
}


# ---------------------------------------------------------------- typed request/response models
class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. payload_too_large")
    message: str


class ClassInfo(BaseModel):
    id: int
    name: str
    pixels: int
    fraction: float = Field(description="share of the image's pixels, 0..1")
    color: tuple[int, int, int]


class MaskUrls(BaseModel):
    png: str
    labels: str
    overlay: str


class SegmentResponse(BaseModel):
    mask_id: str
    model: str
    trained: bool = Field(description="false for random-init bundles: the mask means nothing")
    width: int
    height: int
    num_inputs: int = Field(description="model inputs run: windows x scales x flips")
    classes: list[ClassInfo]
    timings: dict[str, float] = Field(description="seconds per stage, plus total")
    urls: MaskUrls


class SegmentQuery(BaseModel):
    """Query parameters of ``POST /segment``; omitted ones take the model's test configuration."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="bundle name; the default model when omitted")
    mode: Literal["whole", "slide"] | None = None
    scales: str | None = Field(None, description="comma list of resize ratios, e.g. 0.75,1,1.25")
    flip: bool = False
    crop: str | None = Field(None, description="window size: 512 or HxW (slide mode)")
    stride: str | None = Field(None, description="window step: 341 or HxW (slide mode)")
    output: Literal["json", "png", "labels", "overlay"] = "json"


class ModelInfo(BaseModel):
    name: str
    default: bool
    arch: str
    variant: str
    dataset: str | None
    trained: bool
    provider: str
    precision: str
    num_classes: int
    classes: list[str]
    palette: list[tuple[int, int, int]]
    palette_version: str
    test_config: dict[str, Any]


class ReadyResponse(BaseModel):
    ready: bool
    draining: bool
    models: list[str]
    problems: list[str]


# ---------------------------------------------------------------- draining state
class Lifecycle:
    """Counts in-flight segment requests and refuses new ones once draining has begun."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin_drain(self) -> None:
        self.draining = True

    @contextmanager
    def track(self) -> Iterator[None]:
        if self.draining:
            raise errors.OverloadedError("server is shutting down; retry on another replica")
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True when every in-flight request finished within ``timeout_s``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


@dataclass
class Services:
    settings: Settings
    manager: ModelManager
    store: MaskStore
    pool: ThreadPoolExecutor
    lifecycle: Lifecycle
    load_error: str | None = None
    loaded: bool = False

    async def in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking NumPy/Pillow work off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args))


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        providers=settings.providers,
        allow_cpu_fallback=settings.allow_cpu_fallback,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        max_queue_size=settings.max_queue_size,
        intra_op_threads=settings.intra_op_threads,
        max_pixels=settings.max_pixels,
        max_tta_inputs=settings.max_tta_inputs,
        max_inputs_per_request=settings.max_inputs_per_request,
        inference_timeout_s=settings.inference_timeout_s,
    )


def per_model_configs(settings: Settings, base: EngineConfig) -> dict[str, EngineConfig]:
    """``SEGSERVE_PER_MODEL`` overrides applied on top of the global engine configuration."""
    try:
        return {name: replace(base, **fields) for name, fields in settings.per_model.items()}
    except TypeError as exc:
        raise ValueError(f"SEGSERVE_PER_MODEL names an unknown engine setting: {exc}") from exc


# ---------------------------------------------------------------- request parsing helpers
def parse_size(name: str, text: str | None, max_size: int) -> tuple[int, int] | None:
    """``512`` -> (512, 512); ``512x1024`` -> (512, 1024) as (height, width)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise errors.InvalidParameterError(
            f"{name} must be N or HxW integers, got {text!r}"
        ) from exc
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2 or min(size) < 1:
        raise errors.InvalidParameterError(f"{name} must be positive N or HxW, got {text!r}")
    if max(size) > max_size:
        raise errors.InvalidParameterError(f"{name} {text} exceeds the limit of {max_size}")
    return size[0], size[1]


def parse_scales(text: str | None, max_scales: int) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        scales = tuple(float(p) for p in text.split(","))
    except ValueError as exc:
        raise errors.InvalidParameterError(f"scales must be numbers, got {text!r}") from exc
    if not all(math.isfinite(s) and s > 0 for s in scales):
        raise errors.InvalidParameterError(f"scales must be positive, got {text!r}")
    if len(scales) > max_scales:
        raise errors.InvalidParameterError(
            f"{len(scales)} scales requested; at most {max_scales} are allowed"
        )
    return scales


async def read_body_capped(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    A declared Content-Length over the limit is refused before reading anything; otherwise the
    bytes actually received are counted, so an absent or lying header changes nothing.
    """
    too_large = errors.PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def extract_image(request: Request, body: bytes) -> bytes:
    """The image bytes from a multipart form (field ``image``) or a raw ``image/*`` body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":

        async def replay() -> AsyncGenerator[bytes, None]:
            yield body

        parser = MultiPartParser(request.headers, replay(), max_files=1, max_fields=16)
        # The body is already in memory and capped: keep the file part there, never on disk.
        parser.spool_max_size = len(body) + 1
        try:
            form = await parser.parse()
        except (MultiPartException, ValueError) as exc:
            raise errors.InvalidImageError(f"malformed multipart body: {exc}") from exc
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise errors.InvalidImageError("multipart body has no file field named 'image'")
        try:
            return await upload.read()
        finally:
            await form.close()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return body
    raise errors.UnsupportedMediaError(
        f"send the image as multipart field 'image' or a raw image/* body, not {content_type!r}"
    )


# ---------------------------------------------------------------- the app
def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    body = ErrorBody(error=code, message=message).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def _check_api_key(request: Request) -> None:
    """401 unless the request carries the configured key (``X-API-Key`` or Bearer)."""
    key = _services(request).settings.api_key
    if key is None:
        return
    given = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization", "")
    if given is None and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    expected = key.get_secret_value().encode()
    if given is None or not hmac.compare_digest(given.encode(), expected):
        raise errors.UnauthorizedError("missing or wrong API key (send X-API-Key)")


ApiKey = Depends(_check_api_key)


def _server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={seconds * 1000:.2f}" for stage, seconds in timings.items())


def create_app(
    settings: Settings | None = None,
    manager: ModelManager | None = None,
    store: MaskStore | None = None,
) -> FastAPI:
    """Build the app; ``manager``/``store`` are made from ``settings`` unless given."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        base = engine_config(settings)
        services = Services(
            settings=settings,
            manager=manager
            or ModelManager(
                settings.model_repository, base, per_model=per_model_configs(settings, base)
            ),
            store=store
            or create_store(
                settings.mask_store, settings.mask_store_max_bytes, settings.mask_ttl_s
            ),
            pool=ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="segserve-io"),
            lifecycle=Lifecycle(),
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
        version="0.1.0",
        summary="Semantic segmentation (SegFormer, SETR) on onnxruntime",
        lifespan=lifespan,
    )
    _install_error_handlers(app)
    app.add_middleware(RequestMetrics)
    _add_routes(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def _load(services: Services) -> None:
    """Load and warm every bundle off the event loop so /healthz answers during warm-up."""
    try:
        manager = services.manager
        await services.in_pool(manager.load_all)
        wanted = services.settings.default_model
        if wanted is not None:
            manager.get(wanted)  # UnknownModelError names the loaded ones
            manager.default_name = wanted
        services.loaded = True
        log.info("models ready: %s", ", ".join(services.manager.names()))
    except Exception as exc:
        services.load_error = f"model loading failed: {exc}"
        log.exception("model loading failed")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.SegserveError)
    async def typed_failure(request: Request, exc: errors.SegserveError) -> Response:
        status, code = next(
            (v for cls, v in ERROR_STATUS.items() if isinstance(exc, cls)), (500, "internal")
        )
        headers = None
        if isinstance(exc, errors.OverloadedError):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        elif isinstance(exc, errors.StoreUnavailableError):
            headers = {"Retry-After": "1"}
        elif isinstance(exc, errors.UnauthorizedError):
            headers = {"WWW-Authenticate": 'ApiKey header="X-API-Key"'}
        return _error_response(status, code, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        )
        return _error_response(422, "invalid_parameter", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        return _error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(500, "internal", "internal server error (see the server log)")


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by model, route template and status.

    The route template (not the raw path) keeps mask ids out of the label set; routes put the
    model they resolved in ``request.state.model``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", None) or "unmatched"
            model = scope.get("state", {}).get("model", "")
            REQUESTS.labels(model, endpoint, str(status)).inc()
            REQUEST_LATENCY.labels(model, endpoint).observe(time.perf_counter() - started)


def _add_routes(app: FastAPI) -> None:
    error_responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody} for status, _ in set(ERROR_STATUS.values())
    }
    image_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"image": {"type": "string", "format": "binary"}},
                        "required": ["image"],
                    }
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive (liveness); says nothing about models."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def readyz(request: Request) -> Response:
        """200 once every model is loaded and warmed and the mask store answers; 503 otherwise."""
        services = _services(request)
        problems = []
        if services.lifecycle.draining:
            problems.append("draining: shutting down")
        if services.load_error:
            problems.append(services.load_error)
        elif not (services.loaded and services.manager.ready):
            problems.append("models are loading")
        try:
            await services.store.check()
        except errors.StoreUnavailableError as exc:
            problems.append(f"mask store unavailable: {exc}")
        body = ReadyResponse(
            ready=not problems,
            draining=services.lifecycle.draining,
            models=services.manager.names() if services.loaded else [],
            problems=problems,
        )
        return JSONResponse(body.model_dump(), status_code=503 if problems else 200)

    @app.get("/metrics", include_in_schema=True)
    async def metrics() -> Response:
        """Prometheus text format: segserve_* plus process and platform collectors."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    def model_info(services: Services, name: str) -> ModelInfo:
        engine = services.manager.get(name)
        meta = engine.bundle.metadata
        return ModelInfo(
            name=engine.name,
            default=engine.name == services.manager.default_name,
            arch=meta.arch,
            variant=meta.variant,
            dataset=meta.dataset,
            trained=meta.trained,
            provider=engine.provider,
            precision=meta.precision,
            num_classes=meta.num_classes,
            classes=list(meta.classes),
            palette=list(meta.palette),
            palette_version=palette_version(meta.palette),
            test_config=meta.test_config.model_dump(),
        )

    def require_loaded(services: Services) -> None:
        if not services.loaded:
            raise errors.OverloadedError(
                services.load_error or "models are still loading", retry_after_s=5
            )

    @app.get("/models", response_model=list[ModelInfo])
    async def list_models(request: Request) -> list[ModelInfo]:
        services = _services(request)
        require_loaded(services)
        return [model_info(services, name) for name in services.manager.names()]

    @app.get("/models/{name}", response_model=ModelInfo, responses=error_responses)
    async def get_model(request: Request, name: str) -> ModelInfo:
        services = _services(request)
        require_loaded(services)
        return model_info(services, name)

    @app.post(
        "/segment",
        response_model=SegmentResponse,
        responses={
            **error_responses,
            200: {"content": {PNG: {}}, "description": "JSON, or a PNG for png/labels/overlay"},
        },
        openapi_extra=image_body,
        dependencies=[ApiKey],
    )
    async def segment(request: Request, query: Annotated[SegmentQuery, Query()]) -> Response:
        """Segment one image; the answer is JSON with a mask id, or the PNG asked for."""
        services = _services(request)
        settings = services.settings
        with services.lifecycle.track():
            require_loaded(services)
            engine = services.manager.get(query.model)
            request.state.model = engine.name
            options = SegmentOptions(
                mode=query.mode,
                scales=parse_scales(query.scales, settings.max_scales),
                flip=query.flip,
                crop=parse_size("crop", query.crop, settings.max_crop),
                stride=parse_size("stride", query.stride, settings.max_crop),
            )
            started = time.perf_counter()
            payload = await extract_image(
                request, await read_body_capped(request, settings.max_upload_bytes)
            )
            received = time.perf_counter()
            image = await services.in_pool(decode_image, payload, settings.max_pixels)
            del payload
            clock = _Clock(started, received, time.perf_counter())
            STAGE_LATENCY.labels(engine.name, "decode").observe(clock.decoded - received)
            height, width = image.shape[:2]
            engine.validate_options(options, height, width)
            result = await engine.segment(image, options)
            return await _respond(services, engine, query.output, image, result, clock)

    async def mask_for(request: Request, mask_id: str) -> tuple[StoredMask, np.ndarray]:
        """The stored mask and the palette of the model that made it (same version only)."""
        services = _services(request)
        mask = await services.store.get(mask_id)
        request.state.model = mask.model
        if mask.model not in services.manager.names():
            raise errors.MaskNotFoundError(
                f"mask {mask_id} was made by model {mask.model!r}, which this server does not serve"
            )
        palette = services.manager.get(mask.model).bundle.metadata.palette
        if palette_version(palette) != mask.palette_version:
            raise errors.MaskNotFoundError(
                f"mask {mask_id} was made with another palette of {mask.model!r}"
            )
        return mask, palette_array(palette)

    def png(request: Request, content: bytes) -> Response:
        ttl = int(_services(request).settings.mask_ttl_s)
        return Response(
            content, media_type=PNG, headers={"Cache-Control": f"private, max-age={ttl}"}
        )

    @app.get("/masks/{mask_id}.png", responses=error_responses, dependencies=[ApiKey])
    async def mask_png(request: Request, mask_id: str) -> Response:
        """The mask coloured with the model's palette."""
        mask, palette = await mask_for(request, mask_id)
        return png(
            request, await _services(request).in_pool(render_color_png, mask.labels, palette)
        )

    @app.get("/masks/{mask_id}/labels.png", responses=error_responses, dependencies=[ApiKey])
    async def mask_labels(request: Request, mask_id: str) -> Response:
        """Class ids as pixel values: 8-bit PNG up to 256 classes, 16-bit above."""
        mask, palette = await mask_for(request, mask_id)
        rendered = await _services(request).in_pool(render_labels_png, mask.labels, len(palette))
        return png(request, rendered)

    @app.get("/masks/{mask_id}/overlay.png", responses=error_responses, dependencies=[ApiKey])
    async def mask_overlay(request: Request, mask_id: str) -> Response:
        """The mask blended over the photo it was made from."""
        mask, palette = await mask_for(request, mask_id)
        if mask.image_jpeg is None:
            raise errors.MaskNotFoundError(f"mask {mask_id} was stored without its photo")
        services = _services(request)
        photo = await services.in_pool(decode_image, mask.image_jpeg, services.settings.max_pixels)
        rendered = await services.in_pool(render_overlay_png, mask.labels, photo, palette)
        return png(request, rendered)


@dataclass
class _Clock:
    """Timestamps of one /segment request: body received, image decoded."""

    started: float
    received: float
    decoded: float


async def _respond(
    services: Services,
    engine: Engine,
    output: str,
    image: np.ndarray,
    result: SegmentResult,
    clock: _Clock,
) -> Response:
    """Turn an engine result into the requested output, timing the encode stage."""
    meta = engine.bundle.metadata
    encode_started = time.perf_counter()

    def timings() -> dict[str, float]:
        finished = time.perf_counter()
        STAGE_LATENCY.labels(engine.name, "encode").observe(finished - encode_started)
        return {
            "receive": clock.received - clock.started,
            "decode": clock.decoded - clock.received,
            **result.timings,
            "encode": finished - encode_started,
            "total": finished - clock.started,
        }

    if output != "json":
        content = await services.in_pool(_render, output, result.labels, image, meta)
        stages = timings()
        return Response(content, media_type=PNG, headers={"Server-Timing": _server_timing(stages)})

    stats, photo_jpeg = await asyncio.gather(
        services.in_pool(class_statistics, result.labels, meta.classes),
        services.in_pool(encode_jpeg, image),
    )
    stored = StoredMask(engine.name, result.labels, palette_version(meta.palette), photo_jpeg)
    mask_id = await services.store.put(stored)
    stages = timings()
    answer = SegmentResponse(
        mask_id=mask_id,
        model=engine.name,
        trained=meta.trained,
        width=int(image.shape[1]),
        height=int(image.shape[0]),
        num_inputs=result.num_inputs,
        classes=[
            ClassInfo(
                id=s.id, name=s.name, pixels=s.pixels, fraction=s.fraction, color=meta.palette[s.id]
            )
            for s in stats
        ],
        timings=stages,
        urls=MaskUrls(
            png=f"/masks/{mask_id}.png",
            labels=f"/masks/{mask_id}/labels.png",
            overlay=f"/masks/{mask_id}/overlay.png",
        ),
    )
    return JSONResponse(answer.model_dump(), headers={"Server-Timing": _server_timing(stages)})


def _render(output: str, labels: np.ndarray, image: np.ndarray, meta: BundleMetadata) -> bytes:
    """The PNG for ``output=png|labels|overlay``."""
    palette = palette_array(meta.palette)
    if output == "png":
        return render_color_png(labels, palette)
    if output == "labels":
        return render_labels_png(labels, meta.num_classes)
    return render_overlay_png(labels, image, palette)
