"""One pass's label map straight from its window logits, an output tile at a time.

mmseg's last steps for a pass (each window's logits resized to the window, summed and divided by
the window count, flipped back, resized to the original image, argmax) materialise C full-size
class planes, though a trained model puts only a few classes in any neighbourhood. Every value
those bilinear resizes produce is a convex combination of logits under known taps, with the same
weights for every class. So over one output tile each class stays between the min and the max of
its logits under the tile's taps, and a class whose max is below another's min loses at every
pixel of the tile; within a tile, a class below the mean of the likeliest classes at every tap
loses too. A tile left with one candidate is that class with no arithmetic at all; the others
compute mmseg's values exactly, for their candidates only. Only strictly beaten classes are
dropped, so argmax's first-index tie order holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from service.geometry import Window

TILE = 64  # output pixels per tile side: smaller is tighter, larger has less Python overhead
REFERENCE_CLASSES = 3  # means of the 1..3 likeliest classes prune a tile's candidates
CV_MAX_CHANNELS = 128  # OpenCV 5 resizes at most this many channels at once


@dataclass(frozen=True)
class AxisTaps:
    """The two source indices and the weight of the second for each destination index of a
    bilinear resize along one axis (half-pixel centres, align_corners False, edges clamped), as
    OpenCV's INTER_LINEAR and ``torch.nn.functional.interpolate`` compute them."""

    low: np.ndarray  # intp
    high: np.ndarray  # intp, low + 1 except at the last source index
    weight: np.ndarray  # float32 in [0, 1)
    factor: int  # destination / source when that is an integer, else 0
    _matrices: dict[tuple[int, int, int, int], np.ndarray] = field(
        default_factory=dict, compare=False, repr=False
    )

    def range_of(self, start: int, stop: int) -> tuple[int, int]:
        """Half-open source range read by destinations ``[start, stop)``."""
        return int(self.low[start]), int(self.high[stop - 1]) + 1

    def matrix(self, start: int, stop: int, offset: int, size: int) -> np.ndarray:
        """Destinations ``[start, stop)`` as a dense (stop - start, size) float32 matrix over the
        sources ``[offset, offset + size)``: small tiles resize fastest as BLAS products. Kept
        for the other tiles of the same row or column."""
        key = (start, stop, offset, size)
        matrix = self._matrices.get(key)
        if matrix is None:
            matrix = np.zeros((stop - start, size), np.float32)
            index = np.arange(stop - start)
            weight = self.weight[start:stop]
            matrix[index, self.low[start:stop] - offset] = 1.0 - weight
            matrix[index, self.high[start:stop] - offset] += weight
            self._matrices[key] = matrix
        return matrix


def axis_taps(source: int, destination: int) -> AxisTaps:
    position = np.maximum((np.arange(destination) + 0.5) * (source / destination) - 0.5, 0.0)
    low = np.minimum(np.floor(position).astype(np.intp), source - 1)
    high = np.minimum(low + 1, source - 1)
    weight = np.where(high > low, position - low, 0.0).astype(np.float32)
    factor = destination // source if destination % source == 0 else 0
    return AxisTaps(low, high, weight, factor)


@dataclass(frozen=True)
class _Source:
    window: Window  # in the resized image, not flipped
    logits: np.ndarray  # (C, h, w)
    rows: AxisTaps  # logits rows -> window rows
    cols: AxisTaps


def pass_labels(
    windows: Sequence[Window],
    logits: Sequence[np.ndarray],
    scaled: tuple[int, int],
    flip: bool,
    original: tuple[int, int],
    dtype: type[np.unsignedinteger],
    tile: int = TILE,
) -> np.ndarray:
    """mmseg's label map of one pass: ``logits[i]`` (C, h, w) is the model output for
    ``windows[i]`` of the resized (and, if ``flip``, mirrored) image of size ``scaled``
    (height, width); the labels have the ``original`` size. A single window covering the image
    is whole mode (its count is 1 everywhere)."""
    width = scaled[1]
    if flip:  # resizes commute with mirroring: mirror the windows instead of the planes
        windows = [Window(w.y1, w.y2, width - w.x2, width - w.x1) for w in windows]
        logits = [values[:, :, ::-1] for values in logits]
    sources = [
        _Source(w, v, axis_taps(v.shape[1], w.height), axis_taps(v.shape[2], w.width))
        for w, v in zip(windows, logits, strict=True)
    ]
    rows, cols = axis_taps(scaled[0], original[0]), axis_taps(width, original[1])
    row_tiles, col_tiles = _tiles(rows, original[0], tile), _tiles(cols, original[1], tile)
    highest, lowest = _bounds(sources, row_tiles, col_tiles)
    candidates = highest >= lowest.max(axis=2, keepdims=True)  # (tile rows, tile cols, C)
    # Every tile gets its first candidate; tiles with several are then computed exactly.
    first = candidates.argmax(axis=2).astype(dtype)
    labels = np.repeat(np.repeat(first, tile, axis=0), tile, axis=1)[: original[0], : original[1]]
    labels = np.ascontiguousarray(labels)
    for i, j in np.argwhere(candidates.sum(axis=2) > 1):
        out_rows = (int(row_tiles.out[i]), int(row_tiles.out[i + 1]))
        out_cols = (int(col_tiles.out[j]), int(col_tiles.out[j + 1]))
        labels[out_rows[0] : out_rows[1], out_cols[0] : out_cols[1]] = _tile_labels(
            sources, rows, cols, out_rows, out_cols, np.flatnonzero(candidates[i, j])
        )
    return labels


@dataclass(frozen=True)
class _TileAxis:
    """Output tiles along one axis and the resized-image range each one reads."""

    out: np.ndarray  # tile i is [out[i], out[i + 1])
    start: np.ndarray  # first resized index read by tile i
    stop: np.ndarray  # one past the last


def _tiles(taps: AxisTaps, size: int, tile: int) -> _TileAxis:
    out = np.append(np.arange(0, size, tile), size)
    return _TileAxis(out, taps.low[out[:-1]], taps.high[out[1:] - 1] + 1)


def _bounds(
    sources: list[_Source], row_tiles: _TileAxis, col_tiles: _TileAxis
) -> tuple[np.ndarray, np.ndarray]:
    """Per tile and class, the max and min of the logits under the tile's taps in all the
    windows it reads: (tile rows, tile cols, C) each, a reduction per tile row and column."""
    classes = sources[0].logits.shape[0]
    shape = (len(row_tiles.start), len(col_tiles.start), classes)
    highest = np.full(shape, -np.inf, np.float32)
    lowest = np.full(shape, np.inf, np.float32)
    for source in sources:
        w = source.window
        row_span, row_ranges = _ranges(row_tiles, w.y1, w.y2, source.rows)
        col_span, col_ranges = _ranges(col_tiles, w.x1, w.x2, source.cols)
        if not row_ranges or not col_ranges:
            continue
        for reduce, combine, into in (
            (np.max, np.maximum, highest),
            (np.min, np.minimum, lowest),
        ):
            by_rows = np.stack([reduce(source.logits[:, a:b], axis=1) for a, b in row_ranges])
            values = np.stack([reduce(by_rows[:, :, a:b], axis=2) for a, b in col_ranges], 1)
            region = into[row_span, col_span]
            combine(region, values, out=region)
    return highest, lowest


def _ranges(
    tiles: _TileAxis, begin: int, end: int, taps: AxisTaps
) -> tuple[slice, list[tuple[int, int]]]:
    """Tiles overlapping the window ``[begin, end)`` along one axis, and the logits range each
    reads."""
    inside = np.flatnonzero((tiles.start < end) & (tiles.stop > begin))
    if len(inside) == 0:
        return slice(0, 0), []
    first = np.maximum(tiles.start[inside], begin) - begin
    last = np.minimum(tiles.stop[inside], end) - begin - 1
    ranges = list(zip(taps.low[first].tolist(), (taps.high[last] + 1).tolist(), strict=True))
    return slice(int(inside[0]), int(inside[-1]) + 1), ranges


def _tile_labels(
    sources: list[_Source],
    rows: AxisTaps,
    cols: AxisTaps,
    out_rows: tuple[int, int],
    out_cols: tuple[int, int],
    candidates: np.ndarray,
) -> np.ndarray | np.intp:
    """Labels of one output tile among ``candidates``, computed exactly for those that survive
    the tile's own pruning (a scalar when one does)."""
    y0, y1 = rows.range_of(*out_rows)  # resized-image pixels this tile reads
    x0, x1 = cols.range_of(*out_cols)
    parts = []
    for source in sources:
        w = source.window
        top, bottom = max(y0, w.y1), min(y1, w.y2)
        left, right = max(x0, w.x1), min(x1, w.x2)
        if top >= bottom or left >= right:
            continue
        local_rows, local_cols = (top - w.y1, bottom - w.y1), (left - w.x1, right - w.x1)
        r0, r1 = source.rows.range_of(*local_rows)
        c0, c1 = source.cols.range_of(*local_cols)
        block = source.logits[:, r0:r1, c0:c1][candidates].transpose(1, 2, 0)  # (r, c, k)
        parts.append((block, source, local_rows, r0, local_cols, c0, top - y0, left - x0))
    keep = _undominated(np.concatenate([part[0].reshape(-1, len(candidates)) for part in parts]))
    if keep.sum() == 1:
        return candidates[keep][0]
    candidates = candidates[keep]

    # mmseg's sum over windows, divided by the number covering each pixel, then the resize to
    # the original image; class-last, so the argmax runs along the contiguous axis.
    merged = np.zeros((y1 - y0, x1 - x0, len(candidates)), np.float32)
    counts = np.zeros((y1 - y0, x1 - x0, 1), np.float32)
    for block, source, local_rows, r0, local_cols, c0, dy, dx in parts:
        values = _resize_class_last(
            block[:, :, keep], source.rows, local_rows, r0, source.cols, local_cols, c0
        )
        merged[dy : dy + values.shape[0], dx : dx + values.shape[1]] += values
        counts[dy : dy + values.shape[0], dx : dx + values.shape[1]] += 1.0
    if len(parts) > 1:
        merged /= counts
    scores = _resize_class_last(merged, rows, out_rows, y0, cols, out_cols, x0)
    return candidates[scores.argmax(axis=2)]


def _resize_class_last(
    values: np.ndarray,
    rows: AxisTaps,
    out_rows: tuple[int, int],
    row_offset: int,
    cols: AxisTaps,
    out_cols: tuple[int, int],
    col_offset: int,
) -> np.ndarray:
    """(h, w, k) holding the sources from the offsets on -> destinations ``out_rows`` x
    ``out_cols``, class-last. An integer upscale maps a block exactly as it maps the whole
    axis, so OpenCV resizes the block and the tile is cut out; otherwise two dense products."""
    height, width, classes = values.shape
    if rows.factor and cols.factor and classes <= CV_MAX_CHANNELS:
        size = (width * cols.factor, height * rows.factor)
        resized = cv2.resize(np.ascontiguousarray(values), size, interpolation=cv2.INTER_LINEAR)
        resized = resized.reshape(size[1], size[0], classes)
        top, left = out_rows[0] - row_offset * rows.factor, out_cols[0] - col_offset * cols.factor
        return resized[
            top : top + out_rows[1] - out_rows[0], left : left + out_cols[1] - out_cols[0]
        ]
    row_matrix = rows.matrix(*out_rows, row_offset, height)
    col_matrix = cols.matrix(*out_cols, col_offset, width)
    tall = row_matrix @ values.reshape(height, width * classes)
    return np.matmul(col_matrix, tall.reshape(row_matrix.shape[0], width, classes))


def _undominated(taps: np.ndarray) -> np.ndarray:
    """Mask of the classes (columns of ``taps``, (n, k)) not beaten at every tap by the mean of
    the one, two or three likeliest classes. Both sides combine the taps with the same convex
    weights, so a class below such a mean at every tap stays below it at every pixel, hence
    below one of those classes; the means catch what single classes miss where regions meet."""
    likeliest = np.argsort(taps.sum(axis=0))[::-1][:REFERENCE_CLASSES]
    references = np.cumsum(taps[:, likeliest], axis=1) / np.arange(1, len(likeliest) + 1)
    margin = (taps[:, :, None] - references[:, None, :]).max(axis=0)
    return (margin >= 0).all(axis=1)
