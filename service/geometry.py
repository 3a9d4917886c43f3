"""Pure geometry and array helpers with mmsegmentation 1.x / mmcv 2.x test-time semantics.

Sizes are ``(width, height)`` where mmcv uses that order (``rescale_size``), ``(height, width)``
everywhere else, as named. Class scores are (C, H, W) float32, processed one class plane at a
time where possible.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np


def scale_size(width: int, height: int, factor: float) -> tuple[int, int]:
    """mmcv ``_scale_size``: ``(int(w * f + 0.5), int(h * f + 0.5))`` (round half up)."""
    return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` with a (long, short) edge pair: keep the ratio, fit both edges."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return scale_size(width, height, factor)


def ratio_size(width: int, height: int, ratio: float) -> tuple[int, int]:
    """Size after mmcv ``Resize(scale_factor=ratio, keep_ratio=True)`` (mmseg 1.x TTA).

    The transform first scales the loaded size by the ratio, then ``imrescale``\\ s the image to
    that size keeping the ratio, which can differ from the first step by one pixel.
    """
    return rescale_size(width, height, scale_size(width, height, ratio))


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """mmcv ``imresize`` with the cv2 backend: bilinear, half-pixel centres, no antialiasing."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one (H, W) float32 score plane, ``align_corners=False`` like mmseg.

    OpenCV's INTER_LINEAR on float32 uses the same half-pixel mapping and edge clamping as
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` (checked by tests).
    One plane at a time: OpenCV's single-channel path is SIMD and several times faster than its
    many-channel one, and a plane stays in cache for what follows (argmax, sums).
    """
    if plane.shape[0] == height and plane.shape[1] == width:
        return plane
    return cv2.resize(plane, (width, height), interpolation=cv2.INTER_LINEAR)


def unpad_logits(logits: np.ndarray, padded: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(C, *size) logits of an input padded bottom/right from ``size`` to ``padded`` (height,
    width), as mmseg handles test-time padding: resized to the padded input (``predict_by_feat``
    with ``pad_shape``), the padding cropped off (``postprocess_result``)."""
    unpadded = np.empty((logits.shape[0], *size), np.float32)
    for channel, plane in enumerate(logits):
        unpadded[channel] = resize_plane(plane, *padded)[: size[0], : size[1]]
    return unpadded


def planes_to_original(
    scores: np.ndarray, scaled: tuple[int, int], flip: bool, original: tuple[int, int]
) -> Iterator[np.ndarray]:
    """Each class plane of one pass taken back to the original image, in mmseg's order.

    ``scores`` (C, h, w) are first resized to the resized image's size ``scaled`` (the decode
    head's resize; a no-op for merged slide logits), then flipped back if the pass was flipped,
    then resized to ``original`` (``postprocess_result``). Sizes are (height, width).
    """
    for plane in scores:
        plane = resize_plane(plane, *scaled)
        if flip:
            plane = np.ascontiguousarray(plane[:, ::-1])
        yield resize_plane(plane, *original)


def argmax_planes(
    planes: Iterable[np.ndarray], dtype: type[np.unsignedinteger] = np.uint8
) -> np.ndarray:
    """Index of the largest plane per pixel, the first one on ties (like ``argmax``), computed
    as the planes stream by so the (C, H, W) stack never has to exist."""
    best: np.ndarray | None = None
    labels: np.ndarray | None = None
    mask: np.ndarray | None = None
    step: np.ndarray | None = None
    for channel, plane in enumerate(planes):
        if best is None:
            best = np.array(plane, dtype=np.float32, copy=True)
            labels = np.zeros(plane.shape, dtype=dtype)
            mask = np.empty(plane.shape, dtype=bool)
            step = np.empty(plane.shape, dtype=dtype)
            continue
        assert labels is not None and mask is not None and step is not None
        np.greater(plane, best, out=mask)
        np.maximum(best, plane, out=best)
        # labels += (channel - labels) * mask, branch-free: a masked copyto costs ~10x more on
        # the scattered masks of early planes. Unsigned wrap-around makes the sum exact.
        np.subtract(dtype(channel), labels, out=step)
        np.multiply(step, mask.view(np.uint8), out=step, casting="unsafe")
        np.add(labels, step, out=labels)
    if labels is None:
        raise ValueError("no score planes")
    return labels


@dataclass(frozen=True)
class Window:
    """One crop of the (resized) image, half-open ``[y1, y2) x [x1, x2)``."""

    y1: int
    y2: int
    x1: int
    x2: int

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    @property
    def width(self) -> int:
        return self.x2 - self.x1


def grid_count(image_size: int, crop: int, stride: int) -> int:
    """mmseg windows along one axis: ``max(size - crop + stride - 1, 0) // stride + 1``."""
    return max(image_size - crop + stride - 1, 0) // stride + 1


def window_grid(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[Window]:
    """mmseg ``slide_inference`` windows, row-major, the last ones clamped to the image edge.

    An image smaller than the crop along an axis gets one window covering that axis whole, so
    such windows are smaller than the crop (mmseg runs the model on them as they are).
    """
    crop_h, crop_w = crop
    stride_h, stride_w = stride
    windows = []
    for row in range(grid_count(height, crop_h, stride_h)):
        for col in range(grid_count(width, crop_w, stride_w)):
            y2 = min(row * stride_h + crop_h, height)
            x2 = min(col * stride_w + crop_w, width)
            windows.append(Window(max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def window_counts(height: int, width: int, windows: list[Window]) -> np.ndarray:
    """Per-pixel number of windows covering it, (H, W) float32 (mmseg's ``count_mat``)."""
    counts = np.zeros((height, width), dtype=np.float32)
    for window in windows:
        counts[window.y1 : window.y2, window.x1 : window.x2] += 1.0
    return counts


def softmax(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    """Numerically stable float32 softmax computed in place (over the class axis by default)."""
    scores -= scores.max(axis=axis, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=axis, keepdims=True)
    return scores


def labels_dtype(num_classes: int) -> type[np.unsignedinteger]:
    """Smallest unsigned type holding every class index."""
    return np.uint8 if num_classes <= 256 else np.uint16
