"""Decoding uploads: every format and colour mode ends as upright RGB uint8 that matches OpenCV's
decoder (an implementation we did not write), and every bad input is the right typed error."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from typing import Literal

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps, PngImagePlugin
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


def _heic_lossless(image: Image.Image, **kw: object) -> bytes:
    """x265 lossless in 4:4:4 with the identity matrix: the RGB bytes round-trip exactly, so the
    photo itself is the oracle."""
    return _save(image, "HEIF", quality=-1, chroma=444, matrix_coefficients=0, **kw)


def _psnr(decoded: np.ndarray, original: np.ndarray) -> float:
    error = np.mean((decoded.astype(np.float64) - original) ** 2)
    return float(10 * np.log10(255**2 / error))


def test_lossless_heic_decodes_exactly(photo: np.ndarray) -> None:
    payload = _heic_lossless(Image.fromarray(photo))
    assert payload[4:12] in (b"ftypheic", b"ftypheix")  # heix: 4:4:4
    np.testing.assert_array_equal(decode_image(payload, MAX_PIXELS), photo)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_photos_decode_close_to_the_photo(photo: np.ndarray, fmt: str) -> None:
    """As phones write them: lossy, 4:2:0, the photo's own size."""
    payload = _save(Image.fromarray(photo), fmt, quality=85)
    decoded = decode_image(payload, MAX_PIXELS)
    assert decoded.dtype == np.uint8 and decoded.shape == photo.shape
    assert _psnr(decoded, photo) > 30


def test_heic_stored_rotated_decodes_upright(photo: np.ndarray) -> None:
    """A phone held upright stores the sensor's pixels and a rotation (HEIF's ``irot``, written
    here from the EXIF orientation as pillow-heif does)."""
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(photo, 1)))
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": undoes the rot90 above
    payload = _heic_lossless(stored, exif=exif.tobytes())
    np.testing.assert_array_equal(decode_image(payload, MAX_PIXELS), photo)


def test_avif_stored_rotated_decodes_upright(photo: np.ndarray) -> None:
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(photo, 1)))
    exif = stored.getexif()
    exif[0x0112] = 6
    decoded = decode_image(_save(stored, "AVIF", quality=95, exif=exif.tobytes()), MAX_PIXELS)
    assert decoded.shape == photo.shape
    assert _psnr(decoded, photo) > 35


def test_heic_with_several_images_gives_its_primary(photo: np.ndarray) -> None:
    other = Image.fromarray(255 - photo)
    payload = _heic_lossless(
        other, save_all=True, append_images=[Image.fromarray(photo)], primary_index=1
    )
    np.testing.assert_array_equal(decode_image(payload, MAX_PIXELS), photo)


def test_high_bit_depth_heic_keeps_the_high_bits() -> None:
    """10-bit HEIF (phones' HDR photos) narrows to 8 bits like 16-bit PNGs: the high byte."""
    ramp = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    payload = _save(Image.fromarray(ramp), "HEIF", quality=-1)
    with Image.open(io.BytesIO(payload)) as opened:
        assert opened.info["bit_depth"] > 8
    decoded = decode_image(payload, MAX_PIXELS)
    np.testing.assert_array_equal(decoded[:, :, 0], decoded[:, :, 2])
    assert np.abs(decoded[:, :, 0].astype(int) - (ramp >> 8)).max() <= 1


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_truncated_phone_photo_is_invalid(photo: np.ndarray, fmt: str) -> None:
    payload = _save(Image.fromarray(photo), fmt, quality=85)
    for kept in (40, len(payload) // 2, len(payload) - 10):
        with pytest.raises(InvalidImageError, match=fmt + "|corrupt"):
            decode_image(payload[:kept], MAX_PIXELS)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "WEBP", "JPEG"])
def test_corrupted_photos_decode_or_name_the_problem(photo: np.ndarray, fmt: str) -> None:
    """Bytes changed at random (and some cut short) either decode or raise one of the typed
    errors, never another exception (a 500). Pillow's AVIF decoder raised RuntimeError on about
    one in eight of these."""
    payload = _save(Image.fromarray(photo[:64, :96]), fmt, quality=70)
    rng = np.random.default_rng(7)
    outcomes: dict[str, int] = {}
    for _ in range(300):
        corrupted = bytearray(payload)
        for index in rng.integers(0, len(payload), int(rng.choice([1, 2, 4, 16]))):
            corrupted[index] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            corrupted = corrupted[: int(rng.integers(0, len(corrupted)))]
        try:
            decoded = decode_image(bytes(corrupted), MAX_PIXELS)
            assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[2] == 3
            outcome = "decoded"
        except (InvalidImageError, PayloadTooLargeError, UnsupportedMediaError) as exc:
            outcome = type(exc).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("InvalidImageError", 0) > 30, outcomes  # the corruptions do bite


def test_heic_pixel_limit_holds_from_the_header(photo: np.ndarray) -> None:
    """Cut off after its header, a HEIC too big still gets the 413, not a decoding error: the
    limit is checked before a pixel is decoded."""
    payload = _save(Image.fromarray(photo), "HEIF", quality=85)
    limit = photo.shape[0] * photo.shape[1] - 1
    with pytest.raises(PayloadTooLargeError, match="19200 pixels"):
        decode_image(payload[: len(payload) // 2], max_pixels=limit)


def test_iso_media_that_is_not_an_image_is_unsupported() -> None:
    """MP4 video shares HEIF's container; only image brands are images."""
    mp4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 40
    with pytest.raises(UnsupportedMediaError):
        decode_image(mp4, MAX_PIXELS)
    with pytest.raises(InvalidImageError):
        decode_image(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00" + b"\x13" * 40, MAX_PIXELS)


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


# Variants cameras, editors and scanners write: each decodes to the first frame, upright.


def _frames(photo: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(photo), Image.fromarray(np.ascontiguousarray(photo[::-1, ::-1]))]


def test_mpo_camera_jpeg_gives_first_frame_upright(photo: np.ndarray) -> None:
    first, second = _frames(photo)
    exif = first.getexif()
    exif[0x0112] = 6  # stored rotated: display needs 90° clockwise
    payload = _save(first, "MPO", save_all=True, append_images=[second], exif=exif)
    with Image.open(io.BytesIO(payload)) as opened:
        assert (opened.format, opened.n_frames) == ("MPO", 2)
    decoded = decode_image(payload, MAX_PIXELS)
    # OpenCV reads the first JPEG of the file and applies its EXIF orientation.
    np.testing.assert_array_equal(decoded, _cv2_rgb(payload))
    assert np.abs(decoded.astype(int) - np.rot90(photo, -1).astype(int)).mean() < 4


def test_progressive_jpeg_matches_opencv(photo: np.ndarray) -> None:
    payload = _save(Image.fromarray(photo), "JPEG", progressive=True, quality=90)
    assert payload.count(b"\xff\xda") > 1
    decoded = decode_image(payload, MAX_PIXELS)
    assert np.abs(decoded.astype(int) - _cv2_rgb(payload).astype(int)).max() <= 3


def test_palette_png_with_transparency_keeps_its_colours(photo: np.ndarray) -> None:
    indexed = Image.fromarray(photo).quantize(colors=16)
    payload = _save(indexed, "PNG", transparency=3)
    decoded = decode_image(payload, MAX_PIXELS)
    palette = np.asarray(indexed.getpalette()[: 16 * 3], dtype=np.uint8).reshape(16, 3)
    np.testing.assert_array_equal(decoded, palette[np.asarray(indexed)])
    np.testing.assert_array_equal(decoded, _cv2_rgb(payload))


def test_grey_with_alpha_is_grey(photo: np.ndarray) -> None:
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    alpha = np.full_like(grey, 9)
    payload = _save(Image.fromarray(np.dstack([grey, alpha]), mode="LA"), "PNG")
    decoded = decode_image(payload, MAX_PIXELS)
    np.testing.assert_array_equal(decoded, np.repeat(grey[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(decoded, _cv2_rgb(payload))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey_keeps_high_byte(fmt: str) -> None:
    ramp = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    payload = _save(image, fmt)
    decoded = decode_image(payload, MAX_PIXELS)
    np.testing.assert_array_equal(
        decoded, np.repeat((ramp >> 8).astype(np.uint8)[:, :, None], 3, 2)
    )
    np.testing.assert_array_equal(decoded, _cv2_rgb(payload))


def test_sixteen_bit_rgb_png_matches_opencv() -> None:
    rgb16 = np.random.default_rng(3).integers(0, 65536, (40, 56, 3), dtype=np.uint16)
    ok, encoded = cv2.imencode(".png", rgb16[:, :, ::-1])  # Pillow cannot write 16-bit RGB
    assert ok
    decoded = decode_image(encoded.tobytes(), MAX_PIXELS)
    np.testing.assert_array_equal(decoded, (rgb16 >> 8).astype(np.uint8))


def test_sixteen_bit_decode_allocates_no_wide_copies() -> None:
    """A 16-bit grey PNG compresses to almost nothing; decoding it must cost a few bytes per
    pixel (the uint16 copy, the uint8 result), not int64 temporaries (24+ bytes per pixel)."""
    height, width = 2000, 1500
    payload = _save(Image.fromarray(np.full((height, width), 4660, np.uint16)), "PNG")
    assert len(payload) < 20_000
    tracemalloc.start()
    try:
        decoded = decode_image(payload, MAX_PIXELS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.shape == (height, width, 3) and decoded[0, 0, 0] == 4660 >> 8
    assert peak < 8 * height * width, f"{peak / (height * width):.1f} bytes per pixel"


def test_animated_webp_gives_first_frame(photo: np.ndarray) -> None:
    first, second = _frames(photo)
    payload = _save(first, "WEBP", save_all=True, append_images=[second], lossless=True)
    with Image.open(io.BytesIO(payload)) as opened:
        assert opened.n_frames == 2
    np.testing.assert_array_equal(decode_image(payload, MAX_PIXELS), photo)


def test_multi_page_tiff_gives_first_page(photo: np.ndarray) -> None:
    first, second = _frames(photo)
    payload = _save(first, "TIFF", save_all=True, append_images=[second])
    with Image.open(io.BytesIO(payload)) as opened:
        assert opened.n_frames == 2
    np.testing.assert_array_equal(decode_image(payload, MAX_PIXELS), photo)


# Encodings whose decoding costs far more than their pixels: refused from the header.


def _rle8_bmp(width: int, height: int, rows: bytes) -> bytes:
    """A BMP with RLE8 compression (Pillow reads it but cannot write it)."""
    palette = bytes(v for i in range(256) for v in (i, 255 - i, i // 2, 0))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    header = b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset)
    return header + info + palette + rows


def _one_pixel_runs(width: int, height: int) -> bytes:
    """Rows of one-pixel runs (the slowest RLE to decode), end-of-line after each row."""
    return (bytes([1, 5, 1, 200]) * (width // 2) + b"\x00\x00") * height + b"\x00\x01"


def test_small_rle_bmp_decodes_like_opencv() -> None:
    payload = _rle8_bmp(64, 32, _one_pixel_runs(64, 32))
    decoded = decode_image(payload, MAX_PIXELS)
    np.testing.assert_array_equal(decoded, _cv2_rgb(payload))
    # BMP palettes are BGR: index i is (B, G, R) = (i, 255 - i, i // 2).
    np.testing.assert_array_equal(decoded[0, :2], [[2, 250, 5], [100, 55, 200]])


def test_large_rle_bmp_is_refused_before_decoding() -> None:
    payload = _rle8_bmp(1200, 1000, _one_pixel_runs(1200, 1000))  # about 0.5 s in Pillow
    started = time.perf_counter()
    with pytest.raises(PayloadTooLargeError, match="RLE"):
        decode_image(payload, MAX_PIXELS)
    assert time.perf_counter() - started < 0.1


def test_tiled_tiff_decodes_and_huge_tiles_are_refused(photo: np.ndarray) -> None:
    tiled = io.BytesIO()
    tifffile.imwrite(tiled, photo, tile=(64, 64), photometric="rgb")
    np.testing.assert_array_equal(decode_image(tiled.getvalue(), MAX_PIXELS), photo)
    huge = io.BytesIO()  # a 16x16 image in one 4096x4096 tile: 48 MB to decode 768 bytes
    tifffile.imwrite(
        huge, photo[:16, :16], tile=(4096, 4096), photometric="rgb", compression="zlib"
    )
    with pytest.raises(PayloadTooLargeError, match="4096x4096"):
        decode_image(huge.getvalue(), MAX_PIXELS)


def test_jpeg_with_too_many_scans_is_refused(photo: np.ndarray) -> None:
    payload = _save(Image.fromarray(photo), "JPEG", progressive=True)
    last_scan, end = payload.rindex(b"\xff\xda"), payload.rindex(b"\xff\xd9")
    repeated = payload[:end] + payload[last_scan:end] * 200 + payload[end:]
    with pytest.raises(PayloadTooLargeError, match="scans"):
        decode_image(repeated, MAX_PIXELS)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_decodes_as_pillow_reads_it_upright(
    photo: np.ndarray, orientation: int, mode: str
) -> None:
    """JPEGs decode through OpenCV (``_decode_opencv``); Pillow's own decode and EXIF transpose
    are the independent check of the pixels and of all eight orientations."""
    image = Image.fromarray(photo[:, :300]).convert(mode)
    exif = image.getexif()
    exif[0x0112] = orientation
    payload = _save(image, "JPEG", exif=exif, quality=90)
    with Image.open(io.BytesIO(payload)) as opened:
        expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    np.testing.assert_array_equal(decode_image(payload, MAX_PIXELS), expected)


_XMP_ORIENTATION_6 = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
    b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_xmp_orientation_is_not_applied_as_opencv_ignores_it(photo: np.ndarray, fmt: str) -> None:
    """mmseg reads photos through OpenCV, which applies EXIF orientation only; Pillow's getexif
    also takes XMP's tiff:Orientation, which turned these photos sideways against mmseg's."""
    if fmt == "PNG":  # Pillow writes a PNG's XMP only as the iTXt chunk other tools write
        text = PngImagePlugin.PngInfo()
        text.add_itxt("XML:com.adobe.xmp", _XMP_ORIENTATION_6.decode())
        payload = _save(Image.fromarray(photo), fmt, pnginfo=text)
    else:
        payload = _save(Image.fromarray(photo), fmt, xmp=_XMP_ORIENTATION_6, lossless=True)
    assert Image.open(io.BytesIO(payload)).getexif()[0x0112] == 6  # Pillow reads it
    decoded = decode_image(payload, MAX_PIXELS)
    np.testing.assert_array_equal(decoded, photo)
    np.testing.assert_array_equal(decoded, _cv2_rgb(payload))


def _png_chunks_recrc(payload: bytes) -> bytes:
    """Recompute every PNG chunk's CRC (after an edit inside one), as an editing tool would."""
    out, position = bytearray(payload), 8
    while position + 8 <= len(out):
        length = int.from_bytes(out[position : position + 4], "big")
        end = position + 8 + length
        out[end : end + 4] = zlib.crc32(bytes(out[position + 4 : end])).to_bytes(4, "big")
        position = end + 4
    return bytes(out)


def _retag_ascii_entry(payload: bytes, old_tag: int, new_tag: int) -> bytes:
    """Give a real file's ASCII EXIF entry another tag's id (a two-byte edit): the entry keeps its
    type, which the new tag does not allow, as in photos from some phones and editors."""
    little = payload.find(b"II*\x00")
    big = payload.find(b"MM\x00*")
    order: Literal["little", "big"] = (
        "big" if big >= 0 and (little < 0 or big < little) else "little"
    )
    entry = old_tag.to_bytes(2, order) + (2).to_bytes(2, order)
    at = payload.find(entry)
    assert at > 0
    return payload[:at] + new_tag.to_bytes(2, order) + payload[at + 2 :]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "CMYK JPEG"])
def test_a_damaged_exif_tag_still_decodes_upright(photo: np.ndarray, fmt: str) -> None:
    """Orientation 6 beside a camera-make entry re-tagged as PhotometricInterpretation (a SHORT
    tag holding text): rewriting that EXIF (Pillow's exif_transpose) raised struct.error, a 500;
    the orientation itself still reads, as OpenCV reads it."""
    stored = np.ascontiguousarray(np.rot90(photo, 1))  # what a camera held sideways stores
    image = Image.fromarray(stored)
    if fmt == "CMYK JPEG":
        image = image.convert("CMYK")
    exif = image.getexif()
    exif[0x0112], exif[0x010F] = 6, "ProbeCam"
    options = {"quality": 95} if fmt == "CMYK JPEG" else {"lossless": True}
    payload = _retag_ascii_entry(
        _save(image, fmt.split()[-1], exif=exif, **options), 0x010F, 0x0106
    )
    if fmt == "PNG":
        payload = _png_chunks_recrc(payload)
    decoded = decode_image(payload, MAX_PIXELS)
    assert decoded.shape == photo.shape
    if fmt == "CMYK JPEG":  # lossy, and CMYK conversions differ by a level
        assert np.abs(decoded.astype(int) - photo.astype(int)).mean() < 6
    else:
        np.testing.assert_array_equal(decoded, photo)
        np.testing.assert_array_equal(decoded, _cv2_rgb(payload))


def test_tiff_whose_tile_size_tag_holds_text_is_invalid(photo: np.ndarray) -> None:
    """A Software tag re-tagged as TileWidth: int() of its text raised ValueError, a 500."""
    payload = _save(Image.fromarray(photo), "TIFF", software="X")
    damaged = _retag_ascii_entry(payload, 0x0131, 0x0142)
    with pytest.raises(InvalidImageError, match="tile size"):
        decode_image(damaged, MAX_PIXELS)


def test_palette_png_without_its_palette_is_invalid(photo: np.ndarray) -> None:
    """A palette PNG with transparency whose PLTE chunk is renamed: Pillow asserted in convert(),
    a 500. OpenCV refuses the file too."""
    payload = bytearray(_save(Image.fromarray(photo).quantize(16), "PNG", transparency=2))
    at = payload.find(b"PLTE")
    payload[at : at + 4] = b"PnTE"
    with pytest.raises(InvalidImageError, match="corrupt PNG"):
        decode_image(_png_chunks_recrc(bytes(payload)), MAX_PIXELS)


def test_sixteen_bit_rgb_tiff_narrows_as_opencv_does() -> None:
    """mmseg reads TIFFs through OpenCV, which narrows 16-bit samples to round(v / 257); Pillow
    keeps the high byte, 1 level off on 14 % of the values."""
    values = np.random.default_rng(4).integers(0, 65536, (40, 60, 3)).astype(np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, values, photometric="rgb")
    decoded = decode_image(buffer.getvalue(), MAX_PIXELS)
    np.testing.assert_array_equal(decoded, np.rint(values / 257).astype(np.uint8))


def test_half_transparent_tiff_is_read_as_opencv_reads_it(photo: np.ndarray) -> None:
    """OpenCV (so mmseg) multiplies a TIFF's colours by its alpha; Pillow dropped the alpha,
    every half-transparent pixel far from mmseg's."""
    alpha = np.random.default_rng(5).integers(0, 256, photo.shape[:2]).astype(np.uint8)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.dstack([photo, alpha]), photometric="rgb", extrasamples=[2])
    decoded = decode_image(buffer.getvalue(), MAX_PIXELS)
    np.testing.assert_array_equal(decoded, _cv2_rgb(buffer.getvalue()))
    assert np.abs(decoded.astype(int) - photo.astype(int) * alpha[..., None] / 255).max() <= 1
