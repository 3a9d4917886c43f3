"""Decoding uploads: every format and colour mode ends as upright RGB uint8 that matches OpenCV's
decoder (an implementation we did not write), and every bad input is the right typed error."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from service.errors import InvalidImageError, PayloadTooLargeError, UnsupportedMediaError
from service.imageio import decode_image, encode_jpeg, encode_png

MAX_PIXELS = 4_000_000


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return data.chelsea()[:120, :160].copy()  # 120x160, a non-square real photograph


def _save(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _cv2_rgb(payload: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_exactly(photo: np.ndarray, fmt: str) -> None:
    kw = {"lossless": True} if fmt == "WEBP" else {}
    payload = _save(Image.fromarray(photo), fmt, **kw)
    decoded = decode_image(payload, MAX_PIXELS)
    assert decoded.dtype == np.uint8 and decoded.shape == photo.shape
    np.testing.assert_array_equal(decoded, photo)
    np.testing.assert_array_equal(decoded, _cv2_rgb(payload))


def test_jpeg_matches_opencv(photo: np.ndarray) -> None:
    payload = encode_jpeg(photo, quality=90)
    decoded = decode_image(payload, MAX_PIXELS)
    # Both use libjpeg(-turbo); IDCT/upsampling choices may differ by a level or two.
    diff = np.abs(decoded.astype(int) - _cv2_rgb(payload).astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5
    assert np.abs(decoded.astype(int) - photo.astype(int)).mean() < 4


def test_grayscale_becomes_three_equal_channels(photo: np.ndarray) -> None:
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    decoded = decode_image(_save(Image.fromarray(grey), "PNG"), MAX_PIXELS)
    assert decoded.shape == (*grey.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], grey)


def test_sixteen_bit_grey_png_keeps_high_byte_like_opencv() -> None:
    ramp = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    ok, encoded = cv2.imencode(".png", ramp)
    assert ok
    payload = encoded.tobytes()
    decoded = decode_image(payload, MAX_PIXELS)
    np.testing.assert_array_equal(decoded[:, :, 0], (ramp >> 8).astype(np.uint8))
    np.testing.assert_array_equal(decoded, _cv2_rgb(payload))


def test_rgba_drops_alpha_like_opencv(photo: np.ndarray) -> None:
    alpha = np.full(photo.shape[:2], 7, dtype=np.uint8)
    rgba = np.dstack([photo, alpha])
    payload = _save(Image.fromarray(rgba), "PNG")
    decoded = decode_image(payload, MAX_PIXELS)
    np.testing.assert_array_equal(decoded, photo)
    np.testing.assert_array_equal(decoded, _cv2_rgb(payload))


def test_palette_image_expands_to_its_colours(photo: np.ndarray) -> None:
    indexed = Image.fromarray(photo).quantize(colors=16)
    payload = _save(indexed, "PNG")
    decoded = decode_image(payload, MAX_PIXELS)
    palette = np.asarray(indexed.getpalette()[: 16 * 3], dtype=np.uint8).reshape(16, 3)
    np.testing.assert_array_equal(decoded, palette[np.asarray(indexed)])
    np.testing.assert_array_equal(decoded, _cv2_rgb(payload))


def test_cmyk_jpeg_converts_to_rgb_close_to_opencv(photo: np.ndarray) -> None:
    payload = _save(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95)
    decoded = decode_image(payload, MAX_PIXELS)
    assert decoded.shape == photo.shape
    assert np.abs(decoded.astype(int) - _cv2_rgb(payload).astype(int)).mean() < 2
    assert np.abs(decoded.astype(int) - photo.astype(int)).mean() < 6


@pytest.mark.parametrize(
    ("orientation", "upright"),
    [
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # stored rotated: display needs 90° clockwise
        (8, lambda a: np.rot90(a, 1)),
        (2, lambda a: a[:, ::-1]),
    ],
)
def test_exif_orientation_is_honoured(photo: np.ndarray, orientation: int, upright) -> None:
    image = Image.fromarray(photo)
    exif = image.getexif()
    exif[0x0112] = orientation
    payload = _save(image, "PNG", exif=exif)
    decoded = decode_image(payload, MAX_PIXELS)
    np.testing.assert_array_equal(decoded, upright(photo))
    # OpenCV's imdecode applies EXIF orientation too: an independent check of the direction.
    np.testing.assert_array_equal(decoded, _cv2_rgb(payload))


def test_gif_first_frame(photo: np.ndarray) -> None:
    frames = [Image.fromarray(photo).quantize(8), Image.fromarray(255 - photo).quantize(8)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buffer.getvalue(), MAX_PIXELS)
    np.testing.assert_array_equal(decoded, np.asarray(frames[0].convert("RGB")))


def test_empty_body_is_invalid() -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"", MAX_PIXELS)


@pytest.mark.parametrize(
    "payload",
    [b"hello, this is plain text", b"%PDF-1.7\n...", b"\x00" * 64, b"<svg xmlns='x'></svg>"],
)
def test_not_an_image_is_unsupported(payload: bytes) -> None:
    with pytest.raises(UnsupportedMediaError):
        decode_image(payload, MAX_PIXELS)


def test_unsupported_real_format_is_415(photo: np.ndarray) -> None:
    payload = _save(Image.fromarray(photo), "PPM")
    with pytest.raises(UnsupportedMediaError, match="PPM"):
        decode_image(payload, MAX_PIXELS)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_invalid(photo: np.ndarray, fmt: str) -> None:
    payload = _save(Image.fromarray(photo), fmt)
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        decode_image(payload[: len(payload) // 2], MAX_PIXELS)


def test_corrupt_header_with_image_signature_is_invalid() -> None:
    with pytest.raises(InvalidImageError):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x13" * 40, MAX_PIXELS)


def test_too_many_pixels_is_refused(photo: np.ndarray) -> None:
    payload = _save(Image.fromarray(photo), "PNG")
    with pytest.raises(PayloadTooLargeError, match="19200 pixels"):
        decode_image(payload, max_pixels=photo.shape[0] * photo.shape[1] - 1)
    assert decode_image(payload, max_pixels=photo.shape[0] * photo.shape[1]).shape == photo.shape


def _png_bomb(width: int, height: int) -> bytes:
    """A well-formed PNG of a few kilobytes whose header claims a huge canvas."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 64, 9)  # only the first rows: enough to be a PNG
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_before_decoding() -> None:
    bomb = _png_bomb(50_000, 50_000)  # 2.5 gigapixels in a few kilobytes
    assert len(bomb) < 10_000
    with pytest.raises(PayloadTooLargeError, match="pixels"):
        decode_image(bomb, MAX_PIXELS)


def test_encode_png_round_trips_through_opencv() -> None:
    rng = np.random.default_rng(0)
    labels8 = rng.integers(0, 150, (33, 47), dtype=np.uint8)
    labels16 = rng.integers(0, 1000, (33, 47), dtype=np.uint16)
    rgb = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    for array in (labels8, labels16):
        back = cv2.imdecode(np.frombuffer(encode_png(array), np.uint8), cv2.IMREAD_UNCHANGED)
        assert back.dtype == array.dtype
        np.testing.assert_array_equal(back, array)
    np.testing.assert_array_equal(_cv2_rgb(encode_png(rgb)), rgb)
    with pytest.raises(ValueError):
        encode_png(rgb.astype(np.float32))
