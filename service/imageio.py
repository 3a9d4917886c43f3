"""Image bytes <-> arrays for the serving path: safe decoding of uploads, PNG/JPEG encoding.

Decoding guarantees an (H, W, 3) uint8 RGB array in upright orientation, or a typed error:
unknown bytes are ``UnsupportedMediaError`` (415), a known format that will not decode is
``InvalidImageError`` (400), and too many pixels is ``PayloadTooLargeError`` (413) raised from the
header alone, before any pixel is decompressed, which is what defuses decompression bombs.
"""

from __future__ import annotations

import io
from typing import Final

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidImageError, PayloadTooLargeError, UnsupportedMediaError

SUPPORTED_FORMATS: Final = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"})
# Leading bytes of the formats above: bytes that start like an image but do not decode are corrupt
# (400); anything else is not an image we read (415).
_SIGNATURES: Final = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)
_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def _looks_like_supported_image(data: bytes) -> bool:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return any(data.startswith(signature) for signature in _SIGNATURES)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        if _looks_like_supported_image(data):
            raise InvalidImageError("corrupt image: the header does not decode") from exc
        raise UnsupportedMediaError(
            f"not an image in a supported format ({', '.join(sorted(SUPPORTED_FORMATS))})"
        ) from exc
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedMediaError(
            f"image format {image.format} is not supported; send one of "
            f"{', '.join(sorted(SUPPORTED_FORMATS))}"
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    return image


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode to RGB uint8; 16-bit grey keeps its high byte instead of clipping."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.int64)
        grey8 = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float32)
        scale = 255.0 if float(grey.max(initial=0.0)) <= 1.0 else 1.0
        grey8 = np.clip(np.rint(grey * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))
    # Alpha is dropped, not composited: the model sees the same colours mmcv.imread would give.
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode uploaded bytes to an upright (H, W, 3) uint8 RGB array (first frame only)."""
    if not data:
        raise InvalidImageError("empty image: the request carried no bytes")
    image = _open(data, max_pixels)
    try:
        image.load()
        upright = ImageOps.exif_transpose(image) or image
        return _to_rgb(upright)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImageError(f"truncated or corrupt {image.format} image: {exc}") from exc
    finally:
        image.close()


def encode_png(array: np.ndarray) -> bytes:
    """(H, W) uint8 -> 8-bit grey, (H, W) uint16 -> 16-bit grey, (H, W, 3) uint8 -> RGB PNG.

    Compression level 1: label maps and masks compress well even at the fastest level, and the
    encode sits on the request's critical path.
    """
    grey = array.ndim == 2 and array.dtype in (np.uint8, np.uint16)
    rgb = array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8
    if not (grey or rgb):
        raise ValueError(f"cannot encode {array.dtype} array of shape {array.shape} as PNG")
    image = Image.fromarray(np.ascontiguousarray(array))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_palette_png(labels: np.ndarray, palette: np.ndarray) -> bytes:
    """Class ids (H, W) uint8 + (N <= 256, 3) palette -> an indexed PNG: small and exact."""
    if labels.dtype != np.uint8 or labels.ndim != 2 or len(palette) > 256:
        raise ValueError("indexed PNGs hold (H, W) uint8 labels and at most 256 colours")
    height, width = labels.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(labels).tobytes())
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette
    image.putpalette(flat.tobytes(), rawmode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG, the compact form the mask store keeps of the photo."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
