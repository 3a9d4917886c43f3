"""``POST /segment``: an image in, a label map out as JSON (stored), a PNG, COCO RLE, GeoJSON
polygons, or the class probabilities as a float16 ``.npy``."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from service import errors
from service.encodings import encode_polygons_json, encode_probabilities_npy, encode_rle_json
from service.engine import Engine, SegmentResult
from service.http.auth import API_KEY
from service.http.delivery import request_holding
from service.http.errors import ERROR_RESPONSES
from service.http.schemas import ClassInfo, MaskUrls, SegmentQuery, SegmentResponse
from service.http.state import Services, ServicesDep
from service.http.uploads import IMAGE_BODY, read_image, until_disconnect
from service.imageio import decode_image, encode_stored_photo
from service.metrics import STAGE_LATENCY
from service.planning import SegmentOptions, request_bytes
from service.render import (
    class_statistics,
    palette_array,
    palette_version,
    render_color_png,
    render_labels_png,
    render_overlay_png,
)
from service.store import StoredMask

PNG = "image/png"
JPEG_SIGNATURE = b"\xff\xd8\xff"
MEDIA_TYPES = {
    "png": PNG,
    "labels": PNG,
    "overlay": PNG,
    "rle": "application/json",
    "polygons": "application/geo+json",
    "probabilities": "application/octet-stream",
}
# Outputs that encode the label map: their encoder's memory is part of the plan's estimate.
ENCODED: dict[str, Literal["rle", "polygons"]] = {"rle": "rle", "polygons": "polygons"}
router = APIRouter()


async def one_value_per_parameter(request: Request) -> None:
    """422 naming each query parameter given more than once: ``scales=0.75&scales=1.25`` (how
    httpx, requests and ``URLSearchParams`` send a list) was read as its last value alone."""
    params = request.query_params
    repeated = sorted({key for key in params if len(params.getlist(key)) > 1})
    if repeated:
        raise errors.InvalidParameterError(
            f"query parameters given more than once: {', '.join(repeated)}; each takes one "
            "value (scales one comma list, e.g. scales=0.75,1,1.25)"
        )


ONE_VALUE_PER_PARAMETER = Depends(one_value_per_parameter)


def parse_size(name: str, text: str | None) -> tuple[int, int] | None:
    """``512`` -> (512, 512); ``512x1024`` -> (512, 1024) as (height, width). Syntax only: the
    limits are checked with the rest of the plan (``service/planning.py``)."""
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
    return size[0], size[1]


def parse_scales(text: str | None) -> tuple[float, ...] | None:
    """``0.75,1,1.25`` -> ratios (syntax only; counts and ranges are checked by the plan)."""
    if text is None:
        return None
    try:
        scales = tuple(float(p) for p in text.split(","))
    except ValueError as exc:
        raise errors.InvalidParameterError(f"scales must be numbers, got {text!r}") from exc
    if not all(math.isfinite(s) and s > 0 for s in scales):
        raise errors.InvalidParameterError(f"scales must be positive, got {text!r}")
    return scales


def segment_options(query: SegmentQuery) -> SegmentOptions:
    return SegmentOptions(
        mode=query.mode,
        scales=parse_scales(query.scales),
        flip=query.flip,
        crop=parse_size("crop", query.crop),
        stride=parse_size("stride", query.stride),
        return_probabilities=query.output == "probabilities",
        encoding=ENCODED.get(query.output),
    )


@router.post(
    "/segment",
    response_model=SegmentResponse,
    responses={
        **ERROR_RESPONSES,
        200: {
            "content": {media: {} for media in MEDIA_TYPES.values()},
            "description": "JSON with a mask id, or the encoding `output` names",
        },
    },
    openapi_extra=IMAGE_BODY,
    dependencies=[API_KEY, ONE_VALUE_PER_PARAMETER],
)
async def segment(
    request: Request,
    query: Annotated[SegmentQuery, Query()],
    svc: ServicesDep,
) -> Response:
    """Segment one image; the answer is JSON with a mask id, or the PNG asked for."""
    settings = svc.settings
    holding = request_holding(request)
    with svc.lifecycle.track():
        svc.manager.require_ready()
        engine = svc.manager.get(query.model)
        request.state.model = engine.name
        options = segment_options(query)
        started = time.perf_counter()
        payload = await read_image(
            request, settings.max_upload_bytes, holding, settings.body_timeout_s
        )
        received = time.perf_counter()
        upload_jpeg = payload if payload.startswith(JPEG_SIGNATURE) else None
        kept = len(upload_jpeg or b"")

        async def decode_and_run(encoded: bytes) -> tuple[np.ndarray, SegmentResult, _Clock]:
            image = await svc.in_pool(decode_image, encoded, settings.max_pixels)
            del encoded
            holding.hold(image.nbytes + kept, "the decoded image")
            clock = _Clock(started, received, time.perf_counter())
            STAGE_LATENCY.labels(engine.name, "decode").observe(clock.decoded - received)
            plan = engine.plan(options, *image.shape[:2])
            meta = engine.bundle.metadata
            needed = request_bytes(plan, meta.num_classes, meta.output.stride)
            holding.hold(needed + kept, "this request")
            return image, await engine.run(image, plan), clock

        work = decode_and_run(payload)
        del payload  # held by the coroutine until decoded (and by upload_jpeg for a JPEG)
        image, result, clock = await until_disconnect(request, work)
        return await _respond(svc, engine, query, image, upload_jpeg, result, clock)


@dataclass
class _Clock:
    """Timestamps of one /segment request: body received, image decoded."""

    started: float
    received: float
    decoded: float


def _server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={seconds * 1000:.2f}" for stage, seconds in timings.items())


async def _respond(
    svc: Services,
    engine: Engine,
    query: SegmentQuery,
    image: np.ndarray,
    upload_jpeg: bytes | None,
    result: SegmentResult,
    clock: _Clock,
) -> Response:
    """Turn an engine result into the requested output, timing the encode stage.

    The store keeps the photo for overlays as JPEG: a JPEG upload as it came (``decode_image``
    turns it back into the same upright pixels, and re-encoding a large photo costs tens of
    milliseconds), anything else encoded once here."""
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

    if query.output != "json":
        content = await svc.in_pool(_encode, query, result, image, engine)
        stages = timings()
        return Response(
            content,
            media_type=MEDIA_TYPES[query.output],
            headers={"Server-Timing": _server_timing(stages)},
        )

    stored_photo = upload_jpeg or await svc.in_pool(encode_stored_photo, image)
    stored = StoredMask(engine.name, result.labels, palette_version(meta.palette), stored_photo)
    stats, mask_id = await asyncio.gather(
        svc.in_pool(class_statistics, result.labels, meta.classes), svc.store.put(stored)
    )
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
            rle=f"/masks/{mask_id}/rle.json",
            polygons=f"/masks/{mask_id}/polygons.geojson",
        ),
    )
    # pydantic writes the JSON itself (a dict and json.dumps of up to 150 classes cost 0.3 ms more).
    return Response(
        answer.model_dump_json(),
        media_type="application/json",
        headers={"Server-Timing": _server_timing(stages)},
    )


def _encode(
    query: SegmentQuery, result: SegmentResult, image: np.ndarray, engine: Engine
) -> bytes | memoryview:
    """The body for any ``output`` but json."""
    meta = engine.bundle.metadata
    labels = result.labels
    if query.output == "probabilities":
        assert result.probabilities is not None
        return encode_probabilities_npy(result.probabilities)
    if query.output == "rle":
        return encode_rle_json(labels, meta.classes, engine.name)
    if query.output == "polygons":
        return encode_polygons_json(labels, meta.classes, query.tolerance, engine.name)
    palette = palette_array(meta.palette)
    if query.output == "png":
        return render_color_png(labels, palette)
    if query.output == "labels":
        return render_labels_png(labels, meta.num_classes)
    return render_overlay_png(labels, image, palette)
