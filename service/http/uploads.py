"""The request body, size-capped while it streams, and the image inside it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Collection
from typing import Any, TypeVar

from fastapi import Request
from python_multipart.multipart import parse_options_header
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service import errors
from service.http.admission import Holding

T = TypeVar("T")

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


async def read_body_capped(
    request: Request, limit: int, holding: Holding, timeout_s: float
) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    A declared Content-Length over the limit is refused before reading anything, and one within
    it is held in ``holding`` at once (a crowd of large uploads is refused before it arrives);
    the bytes actually received are counted too, so an absent or lying header changes nothing.
    The whole body must arrive within ``timeout_s`` (408), so a slow sender cannot keep a
    connection and its memory forever; a client that goes away mid-body is ``ClientClosedError``.
    """
    too_large = errors.PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit():
        if int(declared) > limit:
            raise too_large
        holding.hold(int(declared), "the request body")
    chunks: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise too_large
                if received > holding.bytes:
                    holding.hold(received, "the request body")
                chunks.append(chunk)
    except TimeoutError:
        raise errors.RequestTimeoutError(
            f"the request body did not arrive within {timeout_s:g} s ({received} bytes received)"
        ) from None
    except ClientDisconnect:
        raise errors.ClientClosedError(
            f"client closed the connection after {received} body bytes"
        ) from None
    return b"".join(chunks)


def content_encoding(request: Request, accepted: Collection[str] = ()) -> str | None:
    """The body's Content-Encoding among ``accepted`` (None for identity), or a 415 before any
    of the body is read: an image is compressed already, so ``/segment`` accepts none."""
    value = request.headers.get("content-encoding", "identity").strip().lower()
    if value in ("", "identity"):
        return None
    if value not in accepted:
        offered = ", ".join([*accepted, "identity"])
        raise errors.UnsupportedMediaError(
            f"Content-Encoding {value!r} is not accepted here (accepted: {offered})"
        )
    return value


def _upload_kind(request: Request) -> str:
    """ "multipart" or "raw" from the Content-Type, or a 415 before any of the body is read."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return "multipart"
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return "raw"
    raise errors.UnsupportedMediaError(
        f"send the image as multipart field 'image' or a raw image/* body, not {content_type!r}"
    )


async def _from_multipart(request: Request, body: bytes) -> bytes:
    """The file field ``image`` of a multipart form held in memory."""

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
        _, options = parse_options_header(request.headers["content-type"])
        if b"--" + options.get(b"boundary", b"") + b"--" not in body:
            raise errors.InvalidImageError(
                "malformed multipart body: it ends before its closing boundary (cut short?)"
            )
        raise errors.InvalidImageError("multipart body has no file field named 'image'")
    try:
        # Options are read from the query string only: a form field (-F model=b2) would be
        # silently ignored, and the answer come from the default model.
        others = sorted(set(form.keys()) - {"image"})
        if others:
            raise errors.InvalidParameterError(
                f"multipart fields other than 'image' are not read: {', '.join(others)}; "
                "options go in the query string, e.g. /segment?model=NAME&mode=slide"
            )
        return await upload.read()
    finally:
        await form.close()


async def read_image(request: Request, limit: int, holding: Holding, timeout_s: float) -> bytes:
    """The encoded image of a request whose body is at most ``limit`` bytes: a multipart form's
    field ``image`` or a raw ``image/*`` body (another Content-Type is refused unread)."""
    kind = _upload_kind(request)
    content_encoding(request)
    body = await read_body_capped(request, limit, holding, timeout_s)
    if kind == "raw":
        return body
    # The parser keeps a copy of the form and the image is read out of it: three bodies at the
    # peak (measured with tracemalloc), where the body alone was held.
    before = holding.bytes
    holding.grow(2 * len(body), "parsing the multipart form")
    try:
        return await _from_multipart(request, body)
    finally:
        holding.hold(before, "the request body")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``work``, cancelled (with the inputs it queued) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise errors.ClientClosedError("client closed the connection before the answer")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the server reports the connection gone (the body has been read, so the only
    message left to receive is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
