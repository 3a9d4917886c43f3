"""The request body, size-capped while it streams, and the image inside it."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser

from service import errors

# OpenAPI: the image as a multipart field or a raw body.
IMAGE_BODY: dict[str, Any] = {
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


async def read_image(request: Request, limit: int) -> bytes:
    """The encoded image of a request whose body is at most ``limit`` bytes."""
    return await extract_image(request, await read_body_capped(request, limit))
