"""One pass's label map straight from its window logits, a small output tile at a time.

mmseg's last steps for a slide pass (each window's logits resized to the window, summed and
divided by the window count, resized to the original image, argmax) materialise C full-size class
planes, though a trained model puts only a few classes in any neighbourhood. Every value those
bilinear resizes produce is a convex combination of logits under known taps, with the same
weights for every class. So over an output tile each class stays between the min and the max of
its logits under the tile's taps, and a class whose max is below another's min loses at every
pixel of the tile; a class below the mean of the likeliest classes at every tap loses too. A tile
left with one candidate is that class with no arithmetic; the others compute mmseg's values
exactly (torch's bilinear formula, float32), for their candidates only. Only strictly beaten
classes are dropped, so argmax's first-index tie order holds.

Whole mode (one window covering the image) computes a contested tile class by class over the
whole tile, each resize step a loop along pixel rows (the steps down vectorise), with a running
argmax: on untrained logits a tile keeps ~18 classes, and bounding each 4x4 cell again (to ~3)
cost more than the arithmetic it saved. Its tiles are cut at cell starts (cells: runs of output
pixels that read the same logits), so a tile reads as few logit rows and columns as its pixels
need.

The per-tile work is a Numba kernel (compiled once, cached on disk), run over bands of output
rows in a small thread pool: in NumPy the calls per tile cost more than the arithmetic.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit

from service.geometry import Window
from service.runtime import default_intra_op_threads

TILE = 16  # output pixels per tile side: candidates are pruned and computed per tile
BAND = 32  # output rows (and columns), whole tiles, whose bounds over all classes are taken at once
REFERENCE_CLASSES = 3  # means of the 1..3 likeliest classes prune a tile's candidates

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


@dataclass(frozen=True)
class AxisTaps:
    """The two source indices and the weight of the second for each destination index of a
    bilinear resize along one axis (half-pixel centres, align_corners False, edges clamped), as
    OpenCV's INTER_LINEAR and ``torch.nn.functional.interpolate`` compute them."""

    low: np.ndarray  # intp
    high: np.ndarray  # intp, low + 1 except at the last source index and where weight is 0
    weight: np.ndarray  # float32 in [0, 1)

    def parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.low, self.high, self.weight


def axis_taps(source: int, destination: int) -> AxisTaps:
    position = np.maximum((np.arange(destination) + 0.5) * (source / destination) - 0.5, 0.0)
    low = np.minimum(np.floor(position).astype(np.intp), source - 1)
    # A zero weight reads ``low`` alone (exactly what the formula gives), so bounds and merges
    # over a tile do not widen by a tap they do not use.
    high = np.where(position > low, np.minimum(low + 1, source - 1), low)
    weight = np.where(high > low, position - low, 0.0).astype(np.float32)
    return AxisTaps(low, high, weight)


class PassLabels(NamedTuple):
    labels: np.ndarray  # (H, W) at the original size
    exact_tiles: int  # tiles that needed arithmetic; the others were one class


def pass_labels(
    windows: Sequence[Window],
    logits: np.ndarray | Sequence[np.ndarray],
    scaled: tuple[int, int],
    original: tuple[int, int],
    dtype: type[np.unsignedinteger],
    tile: int = TILE,
    band: int = BAND,
) -> PassLabels:
    """mmseg's label map of one pass: ``logits[i]`` (C, h, w) is the model output for
    ``windows[i]`` (all of one size) of the resized image of size ``scaled`` (height, width);
    the labels have the ``original`` size. A single window covering the image is whole mode."""
    stacked = np.ascontiguousarray(logits, dtype=np.float32)  # (N, C, h, w)
    height, width = windows[0].height, windows[0].width
    if any((w.height, w.width) != (height, width) for w in windows):
        raise ValueError("pass_labels needs windows of one size")
    same_size = tuple(scaled) == tuple(original)
    whole = len(windows) == 1 and (windows[0].y1, windows[0].x1, height, width) == (0, 0, *scaled)
    layout = _layout(
        stacked.shape[2:], (height, width), tuple(scaled), tuple(original), whole, tile
    )
    row_cuts = layout.row_cuts
    per_band = max(band // tile, 1)
    labels = np.empty(original, dtype)
    arguments = (
        stacked,
        (
            np.array([w.y1 for w in windows], np.intp),
            np.array([w.x1 for w in windows], np.intp),
            height,
            width,
        ),
        layout.window_taps,
        layout.image_taps,
        row_cuts,
        layout.col_cuts,
        per_band,
        same_size,
        whole,
        labels,
    )
    bands = -(-(len(row_cuts) - 1) // per_band)
    threads = min(default_intra_op_threads(), bands)
    if threads <= 1:
        return PassLabels(labels, _label_bands(*arguments, 0, bands))
    # Pieces taken in turn, each a share of the bands left (down to one band), so the threads
    # finish together however the contested tiles fall (with fixed quarters one thread idled
    # 0.7 ms of 4.3 at 512x512), and large images pay few per-piece calls. The calling thread
    # takes pieces too instead of waiting for a pool thread.
    pieces = iter(_guided_pieces(bands, 2 * threads))

    def take_pieces() -> int:
        return sum(_label_bands(*arguments, *piece) for piece in pieces)

    helpers = [executor().submit(take_pieces) for _ in range(threads - 1)]
    exact = take_pieces() + sum(helper.result() for helper in helpers)
    return PassLabels(labels, exact)


def _guided_pieces(bands: int, shares: int) -> list[tuple[int, int]]:
    """Consecutive ``(first, last)`` band ranges covering ``bands``, each ``1 / shares`` of
    the bands not yet given out, rounded up."""
    pieces: list[tuple[int, int]] = []
    while (first := pieces[-1][1] if pieces else 0) < bands:
        pieces.append((first, first + -(-(bands - first) // shares)))
    return pieces


class _Layout(NamedTuple):
    window_taps: tuple[np.ndarray, ...]  # logits -> window: rows' low, high, weight, then columns'
    image_taps: tuple[np.ndarray, ...]  # resized image -> original, the same way
    row_cuts: np.ndarray
    col_cuts: np.ndarray


@functools.lru_cache(maxsize=32)
def _layout(
    logit_size: tuple[int, int],
    window_size: tuple[int, int],
    scaled: tuple[int, int],
    original: tuple[int, int],
    whole: bool,
    tile: int,
) -> _Layout:
    """A pass's taps and tile cuts, which depend on its sizes only: made once per geometry
    (0.3-0.5 ms of Python a request at 512x512, before any band can start). The kernel only
    reads them."""
    window_rows, window_cols = (
        axis_taps(logit_size[0], window_size[0]),
        axis_taps(logit_size[1], window_size[1]),
    )
    rows, cols = axis_taps(scaled[0], original[0]), axis_taps(scaled[1], original[1])
    if whole:  # tiles of whole cells: no logit row or column read for a pixel outside
        same_size = scaled == original
        row_cuts = tile_cuts(cell_starts(rows, window_rows, same_size), original[0], tile)
        col_cuts = tile_cuts(cell_starts(cols, window_cols, same_size), original[1], tile)
    else:
        row_cuts = np.append(np.arange(0, original[0], tile), original[0])
        col_cuts = np.append(np.arange(0, original[1], tile), original[1])
    return _Layout(
        (*window_rows.parts(), *window_cols.parts()),
        (*rows.parts(), *cols.parts()),
        row_cuts,
        col_cuts,
    )


def cell_starts(image: AxisTaps, window: AxisTaps, same_size: bool) -> np.ndarray:
    """Whole mode, along one axis: the output pixels where a cell starts (where the logits a
    pixel reads change, or through both resizes the first of them)."""
    if same_size:
        first, last = window.low, window.high
        changed = (first[1:] != first[:-1]) | (last[1:] != last[:-1])
    else:
        first = window.low[image.low]
        changed = first[1:] != first[:-1]
    return np.concatenate(([0], np.flatnonzero(changed) + 1))


def tile_cuts(starts: np.ndarray, size: int, tile: int) -> np.ndarray:
    """Tile boundaries along an axis of ``size`` pixels, from 0 to ``size``, the others among
    the cell ``starts`` (ascending, from 0): each tile as many whole cells as fit in ``tile``
    pixels, one cell where a cell is longer."""
    cuts = [0]
    while cuts[-1] + tile < size:
        last = starts[np.searchsorted(starts, cuts[-1] + tile, side="right") - 1]
        if last <= cuts[-1]:  # one cell longer than a tile
            following = np.searchsorted(starts, cuts[-1], side="right")
            last = starts[following] if following < len(starts) else size
        cuts.append(int(last))
    if cuts[-1] < size:
        cuts.append(size)
    return np.array(cuts, np.intp)


def warm_up() -> None:
    """Compile (or load from Numba's cache) the kernel for both label dtypes."""
    windows = [Window(0, 8, 0, 8), Window(0, 8, 4, 12)]
    logits = np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32)
    for dtype in (np.uint8, np.uint16):
        pass_labels(windows, logits, (8, 12), (10, 15), dtype, tile=4, band=8)


def executor() -> ThreadPoolExecutor:
    """The kernel releases the GIL, so plain threads run bands in parallel. A pool of its own:
    the engine's pool runs this function, and waiting on one's own pool can deadlock."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=default_intra_op_threads(), thread_name_prefix="labelmap"
            )
        return _pool


# ---------------------------------------------------------------------------- Numba kernel
# Arguments shared by the functions below: ``logits`` (N, C, h, w); ``windows`` is (win_y, win_x,
# win_h, win_w): window n covers resized-image rows [win_y[n], win_y[n] + win_h) and columns
# [win_x[n], win_x[n] + win_w); ``window_taps`` (wr_*, wc_*) are the logits -> window taps and
# ``image_taps`` (r_*, c_*) the resized image -> original taps, each (low, high, weight).
# Element-wise maxima and minima are ``np.fmax`` / ``np.fmin`` (NaN never wins, as in a strict
# comparison): Numba compiles ``a if a > b else b`` to a branch that LLVM leaves scalar, 2-3x
# slower in these loops on an AVX2 EPYC. Scalar reductions (short runs of taps) keep the
# comparison, which is faster there than ``fmax``.


@njit(nogil=True, cache=True, boundscheck=False)
def _label_bands(logits, windows, window_taps, image_taps, row_cuts, col_cuts, per_band, same_size,
                 whole, labels, first, last):  # fmt: skip
    """Labels of the output bands ``first`` to ``last`` (exclusive), a band being ``per_band``
    rows of tiles (tile edges at ``row_cuts`` and ``col_cuts``); returns the number of tiles
    computed exactly. Each band's blocks (``per_band`` tiles square) first get bounds over every
    class, separably (max/min over logit rows for whole rows, then over each block's columns);
    their tiles then start from the block's candidates."""
    win_y, win_x, win_h, win_w = windows
    wr_lo, wr_hi, _, wc_lo, wc_hi, _ = window_taps
    r_lo, r_hi, _, c_lo, c_hi, _ = image_taps
    n_win, n_cls, _, lw = logits.shape
    tile_rows, tile_cols = len(row_cuts) - 1, len(col_cuts) - 1
    n_blocks = -(-tile_cols // per_band)
    row_hi = np.empty((n_cls, lw), np.float32)
    row_lo = np.empty((n_cls, lw), np.float32)
    block_hi = np.empty((n_blocks, n_cls), np.float32)
    block_lo = np.empty((n_blocks, n_cls), np.float32)
    every = np.arange(n_cls)
    block_cand = np.empty(n_cls, np.int64)
    cand = np.empty(n_cls, np.int64)
    hi = np.empty(n_cls, np.float32)
    lo = np.empty(n_cls, np.float32)
    exact = 0
    for i in range(first, last):
        t0, t1 = i * per_band, min((i + 1) * per_band, tile_rows)
        oy0, oy1 = row_cuts[t0], row_cuts[t1]
        y0, y1 = r_lo[oy0], r_hi[oy1 - 1] + 1
        block_hi[:] = -np.inf
        block_lo[:] = np.inf
        for n in range(n_win):
            top, bottom, a0, a1 = _overlap(y0, y1, win_y[n], win_h, wr_lo, wr_hi)
            if top >= bottom:
                continue
            for c in range(n_cls):
                row_hi[c] = logits[n, c, a0]
                row_lo[c] = logits[n, c, a0]
                for a in range(a0 + 1, a1):
                    for b in range(lw):
                        row_hi[c, b] = np.fmax(logits[n, c, a, b], row_hi[c, b])
                        row_lo[c, b] = np.fmin(logits[n, c, a, b], row_lo[c, b])
            for j in range(n_blocks):
                ox0, ox1 = col_cuts[j * per_band], col_cuts[min((j + 1) * per_band, tile_cols)]
                x0, x1 = c_lo[ox0], c_hi[ox1 - 1] + 1
                left, right, b0, b1 = _overlap(x0, x1, win_x[n], win_w, wc_lo, wc_hi)
                if left >= right:
                    continue
                for c in range(n_cls):
                    h, low = block_hi[j, c], block_lo[j, c]
                    for b in range(b0, b1):
                        h = row_hi[c, b] if row_hi[c, b] > h else h
                        low = row_lo[c, b] if row_lo[c, b] < low else low
                    block_hi[j, c], block_lo[j, c] = h, low
        for j in range(n_blocks):
            k_block = _beaten_out(block_hi[j], block_lo[j], every, n_cls, block_cand)
            for ty in range(t0, t1):
                for tx in range(j * per_band, min((j + 1) * per_band, tile_cols)):
                    exact += _label_tile(
                        logits, windows, window_taps, image_taps, same_size, whole,
                        (row_cuts[ty], row_cuts[ty + 1]), (col_cuts[tx], col_cuts[tx + 1]),
                        block_cand, k_block, cand, hi, lo, labels,
                    )  # fmt: skip
    return exact


@njit(nogil=True, cache=True, boundscheck=False)
def _overlap(begin, end, offset, size, low, high):
    """Where ``[begin, end)`` meets a window's ``[offset, offset + size)`` along one axis: that
    range and the half-open logits range its taps (``low``, ``high``) read; empty when the first
    value is not below the second."""
    first, last = max(begin, offset), min(end, offset + size)
    if first >= last:
        return first, last, 0, 0
    return first, last, low[first - offset], high[last - 1 - offset] + 1


@njit(nogil=True, cache=True, boundscheck=False)
def _merged_windows(logits, windows, window_taps, region, classes, k):
    """mmseg's slide merge of classes ``classes[:k]`` over the resized-image ``region`` (rows
    y0:y1, cols x0:x1): each window's logits resized to the window (columns first, then rows, as
    torch's bilinear kernel, in float32), summed, divided by the number of windows covering each
    pixel; (rows, cols, k) float32. The classes are the inner axis, copied once from the logits
    under the region, so every resize step runs over contiguous classes and vectorises. Shared
    by the single-pass and the TTA label maps."""
    win_y, win_x, win_h, win_w = windows
    wr_lo, wr_hi, wr_w, wc_lo, wc_hi, wc_w = window_taps
    y0, y1, x0, x1 = region
    n_win = logits.shape[0]
    one = np.float32(1.0)
    merged = np.zeros((y1 - y0, x1 - x0, k), np.float32)
    count = np.zeros((y1 - y0, x1 - x0), np.float32)
    for n in range(n_win):
        top, bottom, a0, a1 = _overlap(y0, y1, win_y[n], win_h, wr_lo, wr_hi)
        left, right, b0, b1 = _overlap(x0, x1, win_x[n], win_w, wc_lo, wc_hi)
        if top >= bottom or left >= right:
            continue
        taps = np.empty((a1 - a0, b1 - b0, k), np.float32)
        for q in range(k):
            for a in range(a0, a1):
                for b in range(b0, b1):
                    taps[a - a0, b - b0, q] = logits[n, classes[q], a, b]
        across = np.empty((a1 - a0, right - left, k), np.float32)
        for x in range(left, right):
            i = x - win_x[n]
            b, b2, wb = wc_lo[i] - b0, wc_hi[i] - b0, wc_w[i]
            for a in range(a1 - a0):
                for q in range(k):
                    across[a, x - left, q] = (one - wb) * taps[a, b, q] + wb * taps[a, b2, q]
        for y in range(top, bottom):
            a, a2, wa = wr_lo[y - win_y[n]] - a0, wr_hi[y - win_y[n]] - a0, wr_w[y - win_y[n]]
            for x in range(right - left):
                out = merged[y - y0, x + left - x0]
                for q in range(k):
                    out[q] += (one - wa) * across[a, x, q] + wa * across[a2, x, q]
        count[top - y0 : bottom - y0, left - x0 : right - x0] += 1
    if n_win > 1:
        for y in range(y1 - y0):
            for x in range(x1 - x0):
                if count[y, x] > 1:
                    merged[y, x] /= count[y, x]
    return merged


@njit(nogil=True, cache=True, boundscheck=False)
def _beaten_out(hi, lo, cand, k, out):
    """Write to ``out`` the candidates whose max reaches the best min; return their count."""
    best_lo = -np.inf
    for q in range(k):
        best_lo = lo[q] if lo[q] > best_lo else best_lo
    kept = 0
    for q in range(k):
        if hi[q] >= best_lo:
            out[kept] = cand[q]
            kept += 1
    return kept


@njit(nogil=True, cache=True, boundscheck=False)
def _label_tile(logits, windows, window_taps, image_taps, same_size, whole, tile_rows, tile_cols,
                block_cand, k, cand, hi, lo, labels):  # fmt: skip
    """Labels of output pixels ``tile_rows`` x ``tile_cols`` (half-open) among the block's
    ``k`` candidates; returns 1 if they needed exact arithmetic. ``cand``, ``hi``, ``lo`` are
    scratch. With ``same_size`` (the resized image is the original) the last resize is the
    identity, and skipped; with ``whole`` (one window covering the resized image) the exact
    labels are computed class by class over the tile (``_label_whole_tile``)."""
    win_y, win_x, win_h, win_w = windows
    wr_lo, wr_hi, _, wc_lo, wc_hi, _ = window_taps
    r_lo, r_hi, r_w, c_lo, c_hi, c_w = image_taps
    (oy0, oy1), (ox0, ox1) = tile_rows, tile_cols
    n_win = logits.shape[0]
    y0, y1 = r_lo[oy0], r_hi[oy1 - 1] + 1  # resized-image pixels this tile reads
    x0, x1 = c_lo[ox0], c_hi[ox1 - 1] + 1
    cand[:k] = block_cand[:k]
    taps = 0
    if k > 1:
        hi[:k] = -np.inf
        lo[:k] = np.inf
        for n in range(n_win):
            top, bottom, a0, a1 = _overlap(y0, y1, win_y[n], win_h, wr_lo, wr_hi)
            left, right, b0, b1 = _overlap(x0, x1, win_x[n], win_w, wc_lo, wc_hi)
            if top >= bottom or left >= right:
                continue
            taps += (a1 - a0) * (b1 - b0)
            for q in range(k):
                h, low = hi[q], lo[q]
                for a in range(a0, a1):
                    for b in range(b0, b1):
                        v = logits[n, cand[q], a, b]
                        h = v if v > h else h
                        low = v if v < low else low
                hi[q], lo[q] = h, low
        k = _beaten_out(hi, lo, cand, k, cand)
    if k > 1 and not whole:  # whole mode's tiles hold few taps: this pruning costs more
        k = _undominated(logits, windows, window_taps, (y0, y1, x0, x1), cand, k, taps)
    if k <= 1:  # one class wins the whole tile (none: every logit is NaN)
        labels[oy0:oy1, ox0:ox1] = cand[0] if k == 1 else 0
        return 0
    if whole:
        _label_whole_tile(logits, window_taps, image_taps, same_size, tile_rows, tile_cols, cand,
                          k, labels)  # fmt: skip
        return 1

    # mmseg's sum over windows divided by the number covering each pixel, then the resize to the
    # original; each resize columns first, then rows, as torch's bilinear kernel computes it.
    merged = _merged_windows(logits, windows, window_taps, (y0, y1, x0, x1), cand, k)
    if same_size:
        for y in range(oy1 - oy0):
            for x in range(ox1 - ox0):
                labels[y + oy0, x + ox0] = cand[_first_argmax(merged[y, x])]
        return 1
    one = np.float32(1.0)
    across = np.empty((y1 - y0, ox1 - ox0, k), np.float32)
    for y in range(y1 - y0):
        for x in range(ox0, ox1):
            b, b2, wb = c_lo[x] - x0, c_hi[x] - x0, c_w[x]
            for q in range(k):
                across[y, x - ox0, q] = (one - wb) * merged[y, b, q] + wb * merged[y, b2, q]
    value = np.empty(k, np.float32)
    for y in range(oy0, oy1):
        a, a2, wa = r_lo[y] - y0, r_hi[y] - y0, r_w[y]
        for x in range(ox1 - ox0):
            for q in range(k):
                value[q] = (one - wa) * across[a, x, q] + wa * across[a2, x, q]
            labels[y, x + ox0] = cand[_first_argmax(value)]
    return 1


@njit(nogil=True, cache=True, boundscheck=False)
def _label_whole_tile(logits, window_taps, image_taps, same_size, tile_rows, tile_cols, cand, k,
                      labels):  # fmt: skip
    """Whole mode's exact labels of output pixels ``tile_rows`` x ``tile_cols`` among the
    candidates ``cand[:k]`` (ascending). Class by class, torch's bilinear steps in float32 over
    the whole tile, columns first, then rows, as ``_merged_windows`` computes them (so the
    labels are the same): the logit rows the tile reads resized across, then down (at the same
    size, straight to the output's rows; through both resizes, to the window's rows, then across
    and down again to the output's). Each value is compared with the best so far, strictly, so
    the first of tied classes wins and NaN never does, as ``_first_argmax``."""
    wr_lo, wr_hi, wr_w, wc_lo, wc_hi, wc_w = window_taps
    r_lo, r_hi, r_w, c_lo, c_hi, c_w = image_taps
    (oy0, oy1), (ox0, ox1) = tile_rows, tile_cols
    if same_size:  # the resized-image pixels the tile reads: its own
        sy0, sy1, sx0, sx1 = oy0, oy1, ox0, ox1
    else:
        sy0, sy1, sx0, sx1 = r_lo[oy0], r_hi[oy1 - 1] + 1, c_lo[ox0], c_hi[ox1 - 1] + 1
    a0 = wr_lo[sy0]
    logit_rows = np.empty((wr_hi[sy1 - 1] + 1 - a0, sx1 - sx0), np.float32)
    # Taps as views made once: a view made per class costs more than the class's arithmetic.
    to_window_columns = (wc_lo[sx0:sx1], wc_hi[sx0:sx1], wc_w[sx0:sx1], 0)
    if same_size:
        to_output_rows = (wr_lo[oy0:oy1], wr_hi[oy0:oy1], wr_w[oy0:oy1], a0)
    else:  # through the window's rows, then across to the output's columns
        to_window_rows = (wr_lo[sy0:sy1], wr_hi[sy0:sy1], wr_w[sy0:sy1], a0)
        to_output_columns = (c_lo[ox0:ox1], c_hi[ox0:ox1], c_w[ox0:ox1], sx0)
        to_output_rows = (r_lo[oy0:oy1], r_hi[oy0:oy1], r_w[oy0:oy1], sy0)
        window = np.empty((sy1 - sy0, sx1 - sx0), np.float32)
        across = np.empty((sy1 - sy0, ox1 - ox0), np.float32)
    best = np.full((oy1 - oy0, ox1 - ox0), -np.inf, np.float32)
    best_class = np.zeros((oy1 - oy0, ox1 - ox0), np.float32)  # exact up to 2**24 classes
    for q in range(k):
        _resize_across(logits[0, cand[q]], a0, to_window_columns, logit_rows)
        if same_size:
            _down_argmax(logit_rows, to_output_rows, q, best, best_class)
        else:
            _resize_down(logit_rows, to_window_rows, window)
            _resize_across(window, 0, to_output_columns, across)
            _down_argmax(across, to_output_rows, q, best, best_class)
    for y in range(oy1 - oy0):
        for x in range(ox1 - ox0):
            labels[oy0 + y, ox0 + x] = cand[np.intp(best_class[y, x])]


@njit(nogil=True, cache=True, boundscheck=False)
def _resize_across(source, first_row, taps, out):
    """Rows ``first_row`` on of ``source`` resized along their columns to ``out``'s, in
    torch's float32 formula; ``taps`` are (low, high, weight, first column of ``source``)."""
    low, high, weight, first = taps
    one = np.float32(1.0)
    for row in range(out.shape[0]):
        values, into = source[first_row + row], out[row]
        for x in range(out.shape[1]):
            w = weight[x]
            into[x] = (one - w) * values[low[x] - first] + w * values[high[x] - first]


@njit(nogil=True, cache=True, boundscheck=False)
def _resize_down(source, taps, out):
    """``source``'s rows resized to ``out``'s; ``taps`` are (low, high, weight, first row of
    ``source``)."""
    low, high, weight, first = taps
    one = np.float32(1.0)
    for row in range(out.shape[0]):
        upper, lower = source[low[row] - first], source[high[row] - first]
        w, into = weight[row], out[row]
        for x in range(out.shape[1]):
            into[x] = (one - w) * upper[x] + w * lower[x]


@njit(nogil=True, cache=True, boundscheck=False)
def _down_argmax(source, taps, q, best, best_class):
    """``_resize_down`` into a running argmax: where class ``q``'s value beats ``best``
    (strictly), it becomes the best and ``q`` the best class. Called for q = 0, 1, ... in
    turn, so a winning ``q`` exceeds the best class so far, and the best class is the max of
    itself and ``q`` times the win: with ``fmax`` for the value (NaN never wins) the loop has
    no branch and vectorises (a conditional expression here ran 3x slower, scalar)."""
    low, high, weight, first = taps
    one = np.float32(1.0)
    q = np.float32(q)
    for row in range(best.shape[0]):
        upper, lower = source[low[row] - first], source[high[row] - first]
        w, top, top_class = weight[row], best[row], best_class[row]
        for x in range(best.shape[1]):
            value = (one - w) * upper[x] + w * lower[x]
            wins = np.float32(value > top[x])
            top[x] = np.fmax(value, top[x])
            top_class[x] = np.fmax(top_class[x], wins * q)


@njit(nogil=True, cache=True, boundscheck=False)
def _first_argmax(values):
    """Index of the largest value, the first of ties, 0 when all are NaN (as the labels of NaN
    logits have always been)."""
    best, index = -np.inf, 0
    for q in range(len(values)):
        if values[q] > best:  # strict: the first of tied classes wins, as in argmax
            best, index = values[q], q
    return index


@njit(nogil=True, cache=True, boundscheck=False)
def _undominated(logits, windows, window_taps, region, cand, k, taps):
    """Drop from ``cand[:k]`` the classes beaten at every one of the tile's ``taps`` by the mean
    of the one, two or three likeliest classes; return how many are left (at least one). Both
    sides combine the taps with the same convex weights, so such a class stays below that mean
    at every pixel, hence below one of those classes; the means catch what single classes miss
    where regions meet. ``region`` is the (y0, y1, x0, x1) the tile reads in the resized image."""
    win_y, win_x, win_h, win_w = windows
    wr_lo, wr_hi, _, wc_lo, wc_hi, _ = window_taps
    y0, y1, x0, x1 = region
    values = np.empty((taps, k), np.float32)
    row = 0
    for n in range(logits.shape[0]):
        top, bottom, a0, a1 = _overlap(y0, y1, win_y[n], win_h, wr_lo, wr_hi)
        left, right, b0, b1 = _overlap(x0, x1, win_x[n], win_w, wc_lo, wc_hi)
        if top >= bottom or left >= right:
            continue
        for q in range(k):
            i = row
            for a in range(a0, a1):
                for b in range(b0, b1):
                    values[i, q] = logits[n, cand[q], a, b]
                    i += 1
        row += (a1 - a0) * (b1 - b0)
    # The likeliest classes by their sum over the taps (any choice keeps the pruning exact).
    sums = np.zeros(k, np.float32)
    for i in range(taps):
        for q in range(k):
            sums[q] += values[i, q]
    references = min(k, REFERENCE_CLASSES)
    likeliest = np.full(references, -1, np.int64)
    for q in range(k):
        if sums[q] != sums[q]:
            continue  # NaN sums come last, as in an argsort
        place = q
        for r in range(references):
            if likeliest[r] < 0 or sums[place] > sums[likeliest[r]]:
                likeliest[r], place = place, likeliest[r]
                if place < 0:
                    break
    filled = int(np.sum(likeliest >= 0))
    for q in range(k):
        if filled < references and sums[q] != sums[q]:
            likeliest[filled] = q
            filled += 1
    # One sweep over the taps: each class's largest margin over each reference mean.
    margin = np.full((references, k), -np.inf, np.float32)
    means = np.empty(references, np.float64)  # float32 sums, divided in float64
    for i in range(taps):
        mean = np.float32(0.0)
        for r in range(references):
            mean += values[i, likeliest[r]]
            means[r] = np.float64(mean) / (r + 1)
        for r in range(references):
            for q in range(k):
                d = values[i, q] - means[r]
                margin[r, q] = np.fmax(d, margin[r, q])
    kept = 0
    for q in range(k):
        if np.all(margin[:, q] >= 0):
            cand[kept] = cand[q]
            kept += 1
    return max(kept, 1)
