"""What a label map becomes for a client: class statistics, label PNG, colour PNG, overlay.

Pure NumPy, Pillow and OpenCV functions, so the routes stay thin and every rendering is testable
without a server. Colours come from the bundle's palette; a stored mask remembers which palette it
was made with (``palette_version``) so a replica never paints it with another one.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from service.geometry import labels_dtype
from service.imageio import encode_palette_png, encode_png

OVERLAY_OPACITY = 0.5  # mmsegmentation's default for its visualiser
# OpenCV's histogram counts 8-bit labels about 5x faster than np.bincount (which widens them to
# int64 first; the statistics sit on the /segment path) but returns float32 counts, exact up to
# 2**24: it is given blocks of at most that many pixels.
_FLOAT32_EXACT_COUNT = 1 << 24


@dataclass(frozen=True)
class ClassShare:
    """One class present in a mask: its id, name, pixel count and share of the image."""

    id: int
    name: str
    pixels: int
    fraction: float


def palette_array(palette: Sequence[Sequence[int]]) -> np.ndarray:
    return np.asarray(palette, dtype=np.uint8).reshape(-1, 3)


def palette_version(palette: Sequence[Sequence[int]]) -> str:
    """A short, stable hash of the colours (12 hex digits)."""
    return _palette_hash(tuple(tuple(colour) for colour in palette))


@functools.lru_cache(maxsize=64)
def _palette_hash(palette: tuple[tuple[int, ...], ...]) -> str:
    """Hashed once per palette: every /segment answer stores it (0.1 ms of the event loop)."""
    return hashlib.sha256(palette_array(palette).tobytes()).hexdigest()[:12]


def label_counts(labels: np.ndarray) -> np.ndarray:
    """Pixels per label id of an (H, W) map, int64, indexed by id (at least up to the largest id
    present)."""
    if labels.dtype != np.uint8:
        return np.bincount(labels.ravel())
    height, width = labels.shape
    rows = max(1, _FLOAT32_EXACT_COUNT // width)
    columns = _FLOAT32_EXACT_COUNT // rows
    counts = np.zeros(256, np.int64)
    for top in range(0, height, rows):
        for left in range(0, width, columns):
            block = labels[top : top + rows, left : left + columns]
            counts += cv2.calcHist([block], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return counts


def class_statistics(labels: np.ndarray, classes: Sequence[str]) -> list[ClassShare]:
    """The classes present, by id, with pixel counts and fractions of the whole image."""
    counts = label_counts(labels)
    beyond = np.flatnonzero(counts[len(classes) :])
    if beyond.size:
        raise ValueError(
            f"label {len(classes) + beyond[-1]} outside the model's {len(classes)} classes"
        )
    present = np.flatnonzero(counts)
    total = int(labels.size)
    return [
        ClassShare(id=i, name=classes[i], pixels=count, fraction=count / total)
        for i, count in zip(present.tolist(), counts[present].tolist(), strict=True)
    ]


def render_labels_png(labels: np.ndarray, num_classes: int) -> bytes:
    """Class ids as grey levels: 8-bit PNG up to 256 classes, 16-bit above."""
    return encode_png(labels.astype(labels_dtype(num_classes), copy=False))


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 colours."""
    if labels.size and int(labels.max()) >= len(palette):
        raise ValueError(
            f"label {int(labels.max())} has no colour in a {len(palette)}-colour palette"
        )
    return palette[labels]


def render_color_png(labels: np.ndarray, palette: np.ndarray) -> bytes:
    """The mask in the model's palette: an indexed PNG when it can be one, RGB otherwise."""
    if len(palette) <= 256:
        if labels.size and int(labels.max()) >= len(palette):
            raise ValueError(
                f"label {int(labels.max())} has no colour in a {len(palette)}-colour palette"
            )
        return encode_palette_png(labels.astype(np.uint8, copy=False), palette)
    return encode_png(colorize(labels, palette))


# Rows blended at once: the float32 temporaries are a band's, not the photo's (whole-image
# temporaries took ~50 bytes a pixel, 2 GB for one 40 MP overlay).
_BLEND_ROWS = 256


def blend_overlay(
    labels: np.ndarray, photo: np.ndarray, palette: np.ndarray, opacity: float = OVERLAY_OPACITY
) -> np.ndarray:
    """``(1 - opacity) * photo + opacity * colour``, rounded, as (H, W, 3) uint8, a band of rows
    at a time."""
    if photo.shape[:2] != labels.shape:
        raise ValueError(f"photo {photo.shape[:2]} and mask {labels.shape} differ in size")
    blended = np.empty(photo.shape, np.uint8)
    for top in range(0, photo.shape[0], _BLEND_ROWS):
        rows = slice(top, top + _BLEND_ROWS)
        mixed = photo[rows].astype(np.float32)
        mixed *= 1.0 - opacity
        colours = colorize(labels[rows], palette).astype(np.float32)
        colours *= opacity
        mixed += colours
        np.rint(mixed, out=mixed)
        np.clip(mixed, 0, 255, out=mixed)
        blended[rows] = mixed
    return blended


def render_overlay_png(
    labels: np.ndarray, photo: np.ndarray, palette: np.ndarray, opacity: float = OVERLAY_OPACITY
) -> bytes:
    return encode_png(blend_overlay(labels, photo, palette, opacity))
