"""Image bytes <-> arrays for the serving path: safe decoding of uploads, PNG/JPEG encoding.

Decoding guarantees an (H, W, 3) uint8 RGB array in upright orientation, or a typed error:
unknown bytes are ``UnsupportedMediaError`` (415), a known format that will not decode is
``InvalidImageError`` (400), and too many pixels is ``PayloadTooLargeError`` (413) raised from the
header alone, before any pixel is decompressed, which is what defuses decompression bombs.
Multi-frame files (camera JPEGs with previews, animations, multi-page TIFFs) give their first
frame. Encodings whose decoding costs far more than their pixels suggest are refused from the
header too (413): RLE bitmaps over ``RLE_BMP_MAX_PIXELS`` (Pillow's RLE decoder is pure Python),
TIFF tiles out of proportion to the image, JPEGs with more than ``JPEG_MAX_SCANS`` scans.
Pillow reads every header; RGB and grey JPEGs and RGB(A) TIFFs then decode through OpenCV
(``_decode_opencv``), the reader mmseg uses.
HEIC/HEIF (what phones write) decode through pillow-heif (libheif, its own limits on), AVIF
through Pillow; both give their primary image with 10-bit narrowed to 8. libheif applies HEIF's
rotation (``irot``/``imir``) itself; Pillow hands AVIF's over as the EXIF orientation, applied
here as for every other format.
"""

from __future__ import annotations

import io
from typing import Final

import cv2
import numpy as np
from PIL import Image
from pillow_heif import register_heif_opener

from service.errors import InvalidImageError, PayloadTooLargeError, UnsupportedMediaError

register_heif_opener()

# MPO is a JPEG with more frames after the first (the preview cameras embed): Pillow names it.
SUPPORTED_FORMATS: Final = frozenset(
    {"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "HEIF", "AVIF"}
)
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
# HEIF and AVIF are ISO media files: an ``ftyp`` box first, whose major brand names the kind. Other
# brands (MP4 video, say) are not images we read.
_HEIF_BRANDS: Final = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}
)
_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
# Pillow's pure-Python RLE decoder takes about 0.4 s per megapixel of one-pixel runs.
RLE_BMP_MAX_PIXELS: Final = 1_000_000
# A tile is decoded whole: its area is allowed up to the image's, or a megapixel for small images.
TIFF_MIN_TILE_ALLOWANCE: Final = 1 << 20
# Every progressive scan revisits the whole coefficient buffer; common encoders write about ten
# per frame. Counted as SOS markers in the file, embedded previews included.
JPEG_MAX_SCANS: Final = 100


def _looks_like_supported_image(data: bytes) -> bool:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return True
    return any(data.startswith(signature) for signature in _SIGNATURES)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
    except MemoryError:
        raise
    # Pillow's parsers raise what a malformed header makes them raise: UnidentifiedImageError
    # and OSError mostly, RuntimeError from the AVIF decoder, struct.error, TypeError and
    # AssertionError from damaged tags and chunks. Every one is the bytes' fault.
    except Exception as exc:
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
    _check_decoding_cost(image, data)
    return image


def _check_decoding_cost(image: Image.Image, data: bytes) -> None:
    """Refuse, from the header, encodings that cost far more to decode than their pixel count."""
    width, height = image.size
    tiles = getattr(image, "tile", None) or ()
    codec = tiles[0].codec_name if tiles else ""
    if codec == "bmp_rle" and width * height > RLE_BMP_MAX_PIXELS:
        raise PayloadTooLargeError(
            f"RLE-compressed BMP of {width}x{height} pixels: RLE bitmaps are decoded up to "
            f"{RLE_BMP_MAX_PIXELS} pixels; send PNG instead"
        )
    if image.format == "TIFF":
        tags = getattr(image, "tag_v2", {})
        tile_width, tile_height = tags.get(322, 0), tags.get(323, 0)
        if not (isinstance(tile_width, int) and isinstance(tile_height, int)):
            raise InvalidImageError(
                f"corrupt TIFF: its tile size tags hold {tile_width!r} x {tile_height!r}"
            )
        if tile_width * tile_height > max(width * height, TIFF_MIN_TILE_ALLOWANCE):
            raise PayloadTooLargeError(
                f"TIFF tiles of {tile_width}x{tile_height} for a {width}x{height} image: a tile "
                "may not exceed the image's area (or a megapixel)"
            )
    if image.format in ("JPEG", "MPO"):
        scans = data.count(b"\xff\xda")
        if scans > JPEG_MAX_SCANS:
            raise PayloadTooLargeError(
                f"JPEG with {scans} scans; at most {JPEG_MAX_SCANS} are decoded"
            )


def _grey_to_rgb(grey8: np.ndarray) -> np.ndarray:
    return np.repeat(grey8[:, :, None], 3, axis=2)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode to RGB uint8; 16-bit grey keeps its high byte instead of clipping.

    Wide modes are narrowed in their own dtype, in place: at most one copy of the pixels at
    their width (no int64 or float64 temporaries, which would be 4-8x the image)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey16 = np.array(image)  # uint16 in the file's byte order
        return _grey_to_rgb((grey16 >> 8).astype(np.uint8))
    if image.mode == "I":  # 32-bit integers: read as 16-bit intensities, like I;16
        grey32 = np.array(image, dtype=np.int32)
        np.clip(grey32, 0, 65535, out=grey32)
        np.right_shift(grey32, 8, out=grey32)
        return _grey_to_rgb(grey32.astype(np.uint8))
    if image.mode == "F":
        grey = np.array(image, dtype=np.float32)
        if float(grey.max(initial=0.0)) <= 1.0:
            grey *= 255.0
        np.rint(grey, out=grey)
        np.clip(grey, 0, 255, out=grey)
        return _grey_to_rgb(grey.astype(np.uint8))
    if image.mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    # Alpha is dropped, not composited: the model sees the same colours mmcv.imread would give.
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


# Formats and Pillow modes decoded through OpenCV, the way ``mmcv.imread`` reads them.
_OPENCV_DECODED: Final = {
    "JPEG": ("RGB", "L"),
    "MPO": ("RGB", "L"),  # its first frame
    # OpenCV narrows 16-bit samples to round(v / 257) (Pillow keeps the high byte) and multiplies
    # colours by a partial alpha: 14 % of a 16-bit TIFF's values and every half-transparent
    # pixel differed from mmseg's by Pillow.
    "TIFF": ("RGB", "RGBA", "RGBa"),
}


def _decode_opencv(data: bytes) -> np.ndarray | None:
    """An upright RGB image as ``mmcv.imread`` reads it: OpenCV (libjpeg-turbo, libtiff), which
    applies the EXIF orientation and writes RGB straight into the array. Pillow's RGB images are
    4 bytes a pixel, and copying one out cost more than its decode (1.3 of 2.4 ms for a 512x512
    JPEG). None where OpenCV cannot decode the file (truncated, say): Pillow then decodes it or
    names the problem. Pillow has read the header already, so the pixel limit and the
    decoding-cost checks hold."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)


# EXIF orientation -> the transposition that shows the stored pixels upright.
_UPRIGHT: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG: Final = 0x0112


def _exif_orientation(image: Image.Image) -> int:
    """The orientation OpenCV (so ``mmcv.imread``) applies: the tag in the file's EXIF block, or
    a TIFF's own tag. Not Pillow's ``getexif()``: it also takes XMP's ``tiff:Orientation`` and a
    PNG's "Raw profile type exif" text, which OpenCV ignores (a photo would come out rotated
    against mmseg's), and ``exif_transpose`` rewrites the whole block, raising on any tag with a
    damaged type. A block or tag that does not parse counts as upright, as OpenCV reads it."""
    try:
        if "exif" in image.info:
            exif = Image.Exif()
            exif.load(image.info["exif"])
            value = exif.get(_ORIENTATION_TAG, 1)
        else:
            value = getattr(image, "tag_v2", {}).get(_ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block: OpenCV reads the pixels as stored
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode uploaded bytes to an upright (H, W, 3) uint8 RGB array of the frame Pillow opens
    at: the first, or a HEIF's primary image."""
    if not data:
        raise InvalidImageError("empty image: the request carried no bytes")
    image = _open(data, max_pixels)
    kind = image.format
    try:
        if image.mode in _OPENCV_DECODED.get(kind or "", ()):
            pixels = _decode_opencv(data)
            if pixels is not None:
                return pixels
        image.load()
        orientation = _exif_orientation(image)
        if orientation in _UPRIGHT:
            with image:
                image = image.transpose(_UPRIGHT[orientation])
        return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
    except MemoryError:
        raise
    # As at open: OSError for truncated data mostly, anything from damaged chunks and tags
    # (an AssertionError from a palette PNG without its palette, say).
    except Exception as exc:
        raise InvalidImageError(
            f"truncated or corrupt {kind} image: {exc or type(exc).__name__}"
        ) from exc
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


JPEG_MAX_SIDE = 65500  # libjpeg refuses a longer side ("Maximum supported image dimension")


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_stored_photo(rgb: np.ndarray) -> bytes:
    """The compact copy of a photo the mask store keeps for overlays: JPEG, or PNG for a side
    JPEG cannot hold (a 1 x 70000 strip is within the pixel limit)."""
    if max(rgb.shape[:2]) > JPEG_MAX_SIDE:
        return encode_png(rgb)
    return encode_jpeg(rgb)
