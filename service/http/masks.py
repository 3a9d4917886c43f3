"""Stored results, rendered or encoded on request (probabilities are not stored: they are
classes x pixels floats; ``POST /segment?output=probabilities`` returns them)."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service import errors
from service.encodings import (
    MAX_POLYGON_TOLERANCE,
    encode_polygons_json,
    encode_rle_json,
    encoding_bytes,
    polygon_corners,
)
from service.http.auth import API_KEY
from service.http.delivery import request_holding
from service.http.errors import ERROR_RESPONSES
from service.http.segment import ONE_VALUE_PER_PARAMETER
from service.http.state import Services, ServicesDep
from service.imageio import decode_image
from service.render import (
    OVERLAY_OPACITY,
    palette_array,
    palette_version,
    render_color_png,
    render_labels_png,
    render_overlay_png,
)
from service.store import StoredMask

PNG = "image/png"
# An overlay's memory beside its labels: the decoded photo and the blend (3 bytes a pixel each),
# the blend's float32 bands, the PNG (up to 3 more for a noisy photo). RLE and polygons hold
# ``encodings.encoding_bytes`` (their measured bytes a pixel are there, shared with /segment's
# plan).
OVERLAY_BYTES_PER_PIXEL = 10
router = APIRouter(dependencies=[API_KEY, ONE_VALUE_PER_PARAMETER], responses=ERROR_RESPONSES)


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


def cached(svc: Services, content: bytes | memoryview, media_type: str = PNG) -> Response:
    ttl = int(svc.settings.mask_ttl_s)
    headers = {"Cache-Control": f"private, max-age={ttl}"}
    if svc.settings.api_key is not None:
        # A browser keeps these: without Vary it answered them from its cache after the key was
        # cleared from the page, to whoever used the browser next.
        headers["Vary"] = "X-API-Key, Authorization"
    return Response(content, media_type=media_type, headers=headers)


@router.get("/masks/{mask_id}.png")
async def mask_png(request: Request, mask_id: str, svc: ServicesDep) -> Response:
    """The mask coloured with the model's palette."""
    mask, palette = await mask_for(request, svc, mask_id)
    return cached(svc, await svc.in_pool(render_color_png, mask.labels, palette))


@router.get("/masks/{mask_id}/labels.png")
async def mask_labels(request: Request, mask_id: str, svc: ServicesDep) -> Response:
    """Class ids as pixel values: 8-bit PNG up to 256 classes, 16-bit above."""
    mask, palette = await mask_for(request, svc, mask_id)
    return cached(svc, await svc.in_pool(render_labels_png, mask.labels, len(palette)))


@router.get("/masks/{mask_id}/overlay.png")
async def mask_overlay(
    request: Request,
    mask_id: str,
    svc: ServicesDep,
    opacity: Annotated[float, Query(ge=0, le=1)] = OVERLAY_OPACITY,
) -> Response:
    """The mask blended over the photo it was made from, ``opacity`` of the mask's colour.

    The one rendering that holds the photo: it takes its bytes from the in-flight budget as
    ``/segment`` does, so concurrent overlays of big photos wait their turn instead of
    outgrowing the process."""
    holding = request_holding(request)
    mask, palette = await mask_for(request, svc, mask_id)
    if mask.image_jpeg is None:
        raise errors.MaskNotFoundError(f"mask {mask_id} was stored without its photo")
    needed = mask.labels.nbytes + OVERLAY_BYTES_PER_PIXEL * mask.labels.size
    holding.hold(needed, "rendering this overlay")
    photo = await svc.in_pool(decode_image, mask.image_jpeg, svc.settings.max_pixels)
    overlay = await svc.in_pool(render_overlay_png, mask.labels, photo, palette, opacity)
    return cached(svc, overlay)


@router.get("/masks/{mask_id}/rle.json")
async def mask_rle(request: Request, mask_id: str, svc: ServicesDep) -> Response:
    """COCO RLE per class present (``pycocotools.mask.decode`` reads each ``segmentation``).

    Holds its measured working memory from the in-flight budget, as overlays do: four
    concurrent encodings of a 29 MP noisy map grew the process by 2.4 GB before."""
    holding = request_holding(request)
    mask, _ = await mask_for(request, svc, mask_id)
    labels = mask.labels
    height, width = labels.shape
    holding.hold(encoding_bytes("rle", height, width, labels.itemsize), "encoding this mask as RLE")
    classes = svc.manager.get(mask.model).bundle.metadata.classes
    content = await svc.in_pool(encode_rle_json, labels, classes, mask.model)
    return cached(svc, content, "application/json")


@router.get("/masks/{mask_id}/polygons.geojson")
async def mask_polygons(
    request: Request,
    mask_id: str,
    svc: ServicesDep,
    tolerance: Annotated[float, Query(ge=0, le=MAX_POLYGON_TOLERANCE)] = 0.0,
) -> Response:
    """GeoJSON MultiPolygon per class in pixel coordinates, simplified by ``tolerance`` pixels.

    Holds its working memory from the in-flight budget: the part that follows the pixels while
    the map's corners are counted, then that and the part that follows the corners."""
    holding = request_holding(request)
    mask, _ = await mask_for(request, svc, mask_id)
    labels = mask.labels
    height, width = labels.shape
    what = "encoding this mask as polygons"
    holding.hold(encoding_bytes("polygons", height, width, labels.itemsize, 0), what)
    corners = await svc.in_pool(polygon_corners, labels)
    holding.hold(encoding_bytes("polygons", height, width, labels.itemsize, corners), what)
    classes = svc.manager.get(mask.model).bundle.metadata.classes
    content = await svc.in_pool(
        encode_polygons_json, labels, classes, tolerance, mask.model, corners
    )
    return cached(svc, content, "application/geo+json")
