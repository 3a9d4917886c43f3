"""Stored results, rendered on request."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import errors
from service.http.auth import API_KEY
from service.http.errors import ERROR_RESPONSES
from service.http.state import Services, ServicesDep
from service.imageio import decode_image
from service.render import (
    palette_array,
    palette_version,
    render_color_png,
    render_labels_png,
    render_overlay_png,
)
from service.store import StoredMask

PNG = "image/png"
router = APIRouter(dependencies=[API_KEY], responses=ERROR_RESPONSES)


async def mask_for(request: Request, svc: Services, mask_id: str) -> tuple[StoredMask, np.ndarray]:
    """The stored mask and the palette of the model that made it (same version only)."""
    mask = await svc.store.get(mask_id)
    request.state.model = mask.model
    if mask.model not in svc.manager.names():
        raise errors.MaskNotFoundError(
            f"mask {mask_id} was made by model {mask.model!r}, which this server does not serve"
        )
    palette = svc.manager.get(mask.model).bundle.metadata.palette
    if palette_version(palette) != mask.palette_version:
        raise errors.MaskNotFoundError(
            f"mask {mask_id} was made with another palette of {mask.model!r}"
        )
    return mask, palette_array(palette)


def png(svc: Services, content: bytes) -> Response:
    ttl = int(svc.settings.mask_ttl_s)
    return Response(content, media_type=PNG, headers={"Cache-Control": f"private, max-age={ttl}"})


@router.get("/masks/{mask_id}.png")
async def mask_png(request: Request, mask_id: str, svc: ServicesDep) -> Response:
    """The mask coloured with the model's palette."""
    mask, palette = await mask_for(request, svc, mask_id)
    return png(svc, await svc.in_pool(render_color_png, mask.labels, palette))


@router.get("/masks/{mask_id}/labels.png")
async def mask_labels(request: Request, mask_id: str, svc: ServicesDep) -> Response:
    """Class ids as pixel values: 8-bit PNG up to 256 classes, 16-bit above."""
    mask, palette = await mask_for(request, svc, mask_id)
    return png(svc, await svc.in_pool(render_labels_png, mask.labels, len(palette)))


@router.get("/masks/{mask_id}/overlay.png")
async def mask_overlay(request: Request, mask_id: str, svc: ServicesDep) -> Response:
    """The mask blended over the photo it was made from."""
    mask, palette = await mask_for(request, svc, mask_id)
    if mask.image_jpeg is None:
        raise errors.MaskNotFoundError(f"mask {mask_id} was stored without its photo")
    photo = await svc.in_pool(decode_image, mask.image_jpeg, svc.settings.max_pixels)
    return png(svc, await svc.in_pool(render_overlay_png, mask.labels, photo, palette))
