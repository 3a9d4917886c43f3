"""Several passes' label map (mean softmax, ``SegTTAModel``), a small output tile at a time.

mmseg resizes every pass's logits to the original image, takes the softmax over classes, averages
the passes and takes the argmax: C full-size float32 planes per pass. Here each pass keeps its
logits at its own resolution (its windows' outputs, or its merged buffer, as for ``labelmap``) and
each output tile reads only the logits under its taps, so memory is the passes' logits plus a
tile's worth of classes (and the probabilities themselves when they are asked for).

The pruning is exact. Over a tile, each pass's resized logit of a class lies between the min and
the max of its logits under the tile's taps (a convex combination, see ``labelmap``). A class's
softmax grows with its own logit and shrinks with every other one's, so at every pixel of the tile

    1 / (1 + sum_{j != c} exp(hi_j - lo_c))  <=  p_c  <=  1 / (1 + sum_{j != c} exp(lo_j - hi_c)),

and the means of these over the passes bound the mean probability. A class whose upper bound is
below another class's lower bound by more than the float32 error of the computation (``SLACK``)
loses at every pixel of the tile, so it is dropped; ties can only be within that error, where the
float32 result is a coin toss anyway. Bounds over every class are taken per 32x32 block, then per
16x16 tile for the block's survivors. A tile left with one class gets it with no arithmetic; the
others compute each pass's values for their candidates exactly as mmseg does (windows resized,
summed, divided by the count, flipped back, resized: torch's bilinear formula in float32), its
softmax, the mean and the argmax, first index on ties. The softmax's denominator needs every class
except those so far below another class's lower bound (``CUTOFF``) that all of them together are
under 2^-24 of it, less than float32 rounding of the sum.

The arithmetic runs over contiguous classes so that it vectorises: the softmax's exp is a float32
polynomial within 1 ulp (NumPy's and Numba's are scalar calls here), its shift the tile's
largest logit bound where no pixel's own maximum is far below it, and its sums reassociated.
Like torch's own vectorised softmax, these differ from a scalar one only in float32 rounding.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic
from numba.typed import List

from service.geometry import Window
from service.labelmap import BAND, TILE, _merged_windows, _overlap, axis_taps, executor
from service.runtime import default_intra_op_threads

# Per pass, in probability units: over float32's error in a softmax and a mean of passes.
SLACK = 1e-4
# exp(-17) < 2^-24: classes below the best lower bound by log(C) + 17 are out of the denominator.
CUTOFF_MARGIN = 17.0
# exp(-60) ~ 1e-26: a pixel's largest softmax term at least this, the float32 floor 1e-38 far below.
COMMON_SHIFT_RANGE = np.float32(60.0)


@dataclass(frozen=True)
class PassLogits:
    """One pass as the tile kernel reads it: ``logits[i]`` (C, h, w) is the model output for
    ``windows[i]`` (all of one size) of the resized image of size ``scaled`` (height, width),
    which was flipped horizontally when ``flip``. A single window covering it is whole mode."""

    windows: Sequence[Window]
    logits: np.ndarray  # (N, C, h, w)
    scaled: tuple[int, int]
    flip: bool


class MeanSoftmax(NamedTuple):
    labels: np.ndarray  # (H, W)
    probabilities: np.ndarray | None  # (C, H, W) float32 when asked
    exact_tiles: int  # tiles that needed arithmetic; the others were one class
    tiles: int


def mean_softmax(
    passes: Sequence[PassLogits],
    original: tuple[int, int],
    dtype: type[np.unsignedinteger],
    probabilities: bool = False,
    tile: int = TILE,
    band: int = BAND,
) -> MeanSoftmax:
    """Argmax of the mean over ``passes`` of their softmax at the ``original`` size (height,
    width), and that mean for every class when ``probabilities`` (no pruning then)."""
    arrays = _kernel_arrays(passes, original)
    num_classes = passes[0].logits.shape[1]
    band_rows = np.append(np.arange(0, original[0], band), original[0])
    band_cols = np.append(np.arange(0, original[1], band), original[1])
    labels = np.empty(original, dtype)
    scores = np.empty((num_classes, *original) if probabilities else (0, 0, 0), np.float32)
    arguments = (*arrays, band_rows, band_cols, tile, labels, scores, probabilities)
    bands = len(band_rows) - 1
    threads = min(default_intra_op_threads(), bands)
    if threads <= 1:
        exact = _mean_softmax_bands(*arguments, 0, bands)
    else:
        # More pieces than threads, so a band full of contested tiles does not hold the others.
        cuts = np.linspace(0, bands, 2 * threads + 1).round().astype(int)
        pieces = [(int(a), int(b)) for a, b in itertools.pairwise(cuts) if b > a]
        pool = executor()
        exact = sum(pool.map(lambda piece: _mean_softmax_bands(*arguments, *piece), pieces))
    tiles = sum(
        -(-(min(y + band, original[0]) - y) // tile) * -(-(min(x + band, original[1]) - x) // tile)
        for y in range(0, original[0], band)
        for x in range(0, original[1], band)
    )
    return MeanSoftmax(labels, scores if probabilities else None, exact, tiles)


def _kernel_arrays(
    passes: Sequence[PassLogits], original: tuple[int, int]
) -> tuple[List, tuple[List, List], tuple[List, ...], tuple[List, ...], np.ndarray]:
    """The passes as typed lists (their shapes differ), so one compiled kernel takes any."""
    logits = List()
    win_y, win_x = List(), List()
    window_taps = tuple(List() for _ in range(6))
    image_taps = tuple(List() for _ in range(6))
    sizes = np.empty((len(passes), 4), np.int64)  # window height, width, scaled width, flip
    num_classes = passes[0].logits.shape[1]
    for p, one in enumerate(passes):
        stacked = np.require(one.logits, np.float32, ("C", "W"))
        if stacked.ndim != 4 or stacked.shape[1] != num_classes:
            raise ValueError(f"pass {p}: logits {stacked.shape}, want (N, {num_classes}, h, w)")
        height, width = one.windows[0].height, one.windows[0].width
        if any((w.height, w.width) != (height, width) for w in one.windows):
            raise ValueError("mean_softmax needs each pass's windows of one size")
        logits.append(stacked)
        win_y.append(np.array([w.y1 for w in one.windows], np.intp))
        win_x.append(np.array([w.x1 for w in one.windows], np.intp))
        taps = (
            axis_taps(stacked.shape[2], height),
            axis_taps(stacked.shape[3], width),
            axis_taps(one.scaled[0], original[0]),
            axis_taps(one.scaled[1], original[1]),
        )
        for target, axis in ((window_taps, taps[:2]), (image_taps, taps[2:])):
            for i, part in enumerate((*axis[0].parts(), *axis[1].parts())):
                target[i].append(part)
        sizes[p] = (height, width, one.scaled[1], int(one.flip))
    return logits, (win_y, win_x), window_taps, image_taps, sizes


def warm_up() -> None:
    """Compile (or load from Numba's cache) the kernel for both label dtypes; labels only and
    with probabilities share each machine code."""
    rng = np.random.default_rng(0)
    whole = PassLogits(
        [Window(0, 8, 0, 12)], rng.standard_normal((1, 3, 2, 3)).astype(np.float32), (8, 12), True
    )
    slide = PassLogits(
        [Window(0, 8, 0, 8), Window(0, 8, 4, 12)],
        rng.standard_normal((2, 3, 2, 2)).astype(np.float32),
        (8, 12),
        False,
    )
    for dtype in (np.uint8, np.uint16):
        for probabilities in (False, True):
            mean_softmax([whole, slide], (10, 15), dtype, probabilities, tile=4, band=8)


# ---------------------------------------------------------------------------- Numba kernel
# Arguments shared by the functions below, one entry per pass in each typed list: ``logits``
# (N, C, h, w); ``windows`` (win_y, win_x): window n of a pass covers its resized-image rows
# [win_y[n], win_y[n] + win_h) and columns [win_x[n], win_x[n] + win_w); ``window_taps`` (wr_*,
# wc_*) the logits -> window taps and ``image_taps`` (r_*, c_*) the resized image -> original
# taps, each (low, high, weight); ``sizes[p]`` (win_h, win_w, scaled width, flip). A flipped
# pass's logits are of the mirrored image: its column x is column ``scaled width - 1 - x`` of the
# unflipped one. ``region`` is (row0, row1, col0, col1) of the output, half-open.


@njit(nogil=True, cache=True, boundscheck=False)
def _mean_softmax_bands(logits, windows, window_taps, image_taps, sizes, band_rows, band_cols,
                        tile, labels, scores, dense, first, last):  # fmt: skip
    """Labels (and with ``dense`` every class's mean probability into ``scores``) of the output
    bands ``first`` to ``last`` (exclusive); returns the number of tiles computed exactly."""
    n_pass = len(logits)
    n_cls = logits[0].shape[1]
    every = np.arange(n_cls)
    block_hi = np.empty((n_pass, n_cls), np.float32)
    block_lo = np.empty((n_pass, n_cls), np.float32)
    tile_hi = np.empty((n_pass, n_cls), np.float32)
    tile_lo = np.empty((n_pass, n_cls), np.float32)
    hi = np.empty(n_cls, np.float32)
    lo = np.empty(n_cls, np.float32)
    upper = np.empty(n_cls, np.float64)
    lower = np.empty(n_cls, np.float64)
    block_cand = np.empty(n_cls, np.int64)
    cand = np.empty(n_cls, np.int64)
    cutoff = np.log(n_cls) + CUTOFF_MARGIN
    exact = 0
    for i in range(first, last):
        oy0, oy1 = band_rows[i], band_rows[i + 1]
        for j in range(len(band_cols) - 1):
            ox0, ox1 = band_cols[j], band_cols[j + 1]
            k_block = n_cls
            block_cand[:] = every
            if not dense:
                block = (oy0, oy1, ox0, ox1)
                for p in range(n_pass):
                    _pass_bounds(logits, windows, window_taps, image_taps, sizes, p, block, every,
                                 n_cls, block_hi[p], block_lo[p])  # fmt: skip
                k_block = _prune(block_hi, block_lo, every, n_cls, upper, lower, block_cand)
            for ty in range(oy0, oy1, tile):
                for tx in range(ox0, ox1, tile):
                    region = (ty, min(ty + tile, oy1), tx, min(tx + tile, ox1))
                    k = k_block
                    cand[:k] = block_cand[:k]
                    if k > 1 and not dense:
                        tile_hi[:] = block_hi
                        tile_lo[:] = block_lo
                        for p in range(n_pass):
                            _pass_bounds(logits, windows, window_taps, image_taps, sizes, p,
                                         region, cand, k, hi, lo)  # fmt: skip
                            for q in range(k):
                                tile_hi[p, cand[q]] = hi[q]
                                tile_lo[p, cand[q]] = lo[q]
                        k = _prune(tile_hi, tile_lo, cand, k, upper, lower, cand)
                    if k <= 1 and not dense:  # one class wins the tile (or none: NaN logits)
                        labels[region[0] : region[1], region[2] : region[3]] = cand[0] if k else 0
                        continue
                    if not dense:  # the denominators' classes, from this tile's own bounds
                        for p in range(n_pass):
                            _pass_bounds(logits, windows, window_taps, image_taps, sizes, p,
                                         region, every, n_cls, tile_hi[p], tile_lo[p])  # fmt: skip
                    _exact_tile(logits, windows, window_taps, image_taps, sizes, region, cand, k,
                                tile_hi, tile_lo, cutoff, dense, labels, scores)  # fmt: skip
                    exact += 1
    return exact


@njit(nogil=True, cache=True, boundscheck=False)
def _pass_region(image_taps, sizes, p, region):
    """The rows and columns of pass ``p``'s resized image (mirrored if flipped) that the output
    ``region`` reads, half-open: (y0, y1, x0, x1)."""
    r_lo, r_hi, c_lo, c_hi = image_taps[0][p], image_taps[1][p], image_taps[3][p], image_taps[4][p]
    oy0, oy1, ox0, ox1 = region
    x0, x1 = c_lo[ox0], c_hi[ox1 - 1] + 1
    if sizes[p, 3]:
        x0, x1 = sizes[p, 2] - x1, sizes[p, 2] - x0
    return r_lo[oy0], r_hi[oy1 - 1] + 1, x0, x1


@njit(nogil=True, cache=True, boundscheck=False)
def _pass_bounds(logits, windows, window_taps, image_taps, sizes, p, region, cls, k, hi, lo):
    """Max and min into ``hi[q]``, ``lo[q]`` of pass ``p``'s logits of class ``cls[q]`` under
    the taps of the output ``region``."""
    values = logits[p]
    win_y, win_x = windows[0][p], windows[1][p]
    wr_lo, wr_hi, wc_lo, wc_hi = (
        window_taps[0][p], window_taps[1][p], window_taps[3][p], window_taps[4][p]
    )  # fmt: skip
    win_h, win_w = sizes[p, 0], sizes[p, 1]
    y0, y1, x0, x1 = _pass_region(image_taps, sizes, p, region)
    hi[:k] = -np.inf
    lo[:k] = np.inf
    for n in range(values.shape[0]):
        top, bottom, a0, a1 = _overlap(y0, y1, win_y[n], win_h, wr_lo, wr_hi)
        left, right, b0, b1 = _overlap(x0, x1, win_x[n], win_w, wc_lo, wc_hi)
        if top >= bottom or left >= right:
            continue
        for q in range(k):
            h, low = hi[q], lo[q]
            for a in range(a0, a1):
                for b in range(b0, b1):
                    v = values[n, cls[q], a, b]
                    h = v if v > h else h
                    low = v if v < low else low
            hi[q], lo[q] = h, low


@njit(nogil=True, cache=True, boundscheck=False)
def _prune(hi, lo, cand, k, upper, lower, out):
    """Write to ``out`` the classes among ``cand[:k]`` whose bound on the mean probability is
    not beaten (``hi``, ``lo``: (passes, C) logit bounds); return their count. NaN bounds keep a
    class (it is left to the exact step)."""
    n_pass = hi.shape[0]
    upper[:k] = 0.0
    lower[:k] = 0.0
    for p in range(n_pass):
        _probability_bounds(hi[p], lo[p], cand, k, upper, lower)
    best = -np.inf
    for q in range(k):
        best = lower[q] if lower[q] > best else best
    kept = 0
    for q in range(k):
        if not upper[q] + SLACK * n_pass < best:
            out[kept] = cand[q]
            kept += 1
    return kept


@njit(nogil=True, cache=True, boundscheck=False)
def _probability_bounds(hi, lo, cand, k, upper, lower):
    """Add one pass's bounds on the softmax of class ``cand[q]`` to ``upper[q]``, ``lower[q]``,
    from that pass's logit bounds ``hi``, ``lo`` over every class (float64).
    ``sum_{j != c} exp(x_j)`` is the sum over all classes minus class c's term, except for the
    largest term, whose rest is summed apart: the subtraction then loses at most a factor 2."""
    up_top, up_sum, up_rest = _exp_sums(lo)
    low_top, low_sum, low_rest = _exp_sums(hi)
    top_lo, top_hi = lo[up_top], hi[low_top]
    for q in range(k):
        c = cand[q]
        others = up_rest if c == up_top else up_sum - np.exp(np.float64(lo[c]) - top_lo)
        others = max(others, 0.0)
        upper[q] += 1.0 / (1.0 + others * np.exp(min(np.float64(top_lo) - hi[c], 700.0)))
        others = low_rest if c == low_top else low_sum - np.exp(np.float64(hi[c]) - top_hi)
        others = max(others, 0.0)
        gap = np.float64(top_hi) - lo[c]
        if gap <= 700.0:
            lower[q] += 1.0 / (1.0 + others * np.exp(gap))
        elif not gap > 700.0:  # NaN
            lower[q] += np.nan


@njit(nogil=True, cache=True, boundscheck=False)
def _exp_sums(x):
    """(index of the largest x, sum of exp(x - largest), that sum without the largest term)."""
    top = 0
    for c in range(len(x)):
        top = c if x[c] > x[top] else top
    total, rest = 0.0, 0.0
    for c in range(len(x)):
        term = np.exp(np.float64(x[c]) - x[top])
        total += term
        if c != top:
            rest += term
    return top, total, rest


@njit(nogil=True, cache=True, boundscheck=False)
def _exact_tile(logits, windows, window_taps, image_taps, sizes, region, cand, k, tile_hi, tile_lo,
                cutoff, dense, labels, scores):  # fmt: skip
    """Mean softmax over the passes of the classes ``cand[:k]`` (ascending) at the output
    ``region``, as mmseg computes it in float32, and its argmax into ``labels`` (with ``dense``,
    where ``cand`` is every class, the means into ``scores`` too). Each pass's denominator sums
    the classes whose upper bound (``tile_hi``) reaches its best lower bound less ``cutoff``.
    Classes are the inner axis, so the resizes and the softmax run over contiguous classes."""
    oy0, oy1, ox0, ox1 = region
    n_pass, n_cls = tile_hi.shape
    rows, cols = oy1 - oy0, ox1 - ox0
    n_pix = rows * cols
    total = np.zeros((n_pix, k), np.float32)
    use = np.empty(n_cls, np.int64)
    position = np.empty(k, np.int64)  # where each candidate is in ``use``
    for p in range(n_pass):
        n_use, q = 0, 0
        floor = tile_lo[p].max() - cutoff
        for c in range(n_cls):
            candidate = q < k and cand[q] == c
            if candidate or dense or tile_hi[p, c] >= floor or np.isnan(tile_hi[p, c]):
                if candidate:
                    position[q] = n_use
                    q += 1
                use[n_use] = c
                n_use += 1
        values = _pass_values(logits, windows, window_taps, image_taps, sizes, p, region, use,
                              n_use).reshape((n_pix, n_use))  # fmt: skip
        shift = np.float32(np.nan) if dense else _common_shift(tile_hi[p], tile_lo[p])
        if np.isnan(shift):
            _shift_by_max(values)
            shift = np.float32(0.0)
        _exp_in_place(values.reshape(n_pix * n_use), shift)
        _add_probabilities(values, position, k, total)
    label = np.empty(n_pix, np.int64)
    passes = np.float32(n_pass)
    for i in range(n_pix):
        sums = total[i]
        best, label[i] = -np.inf, cand[0]
        for q in range(k):
            mean = sums[q] / passes
            if mean > best:  # strict: the first of tied classes wins, as in argmax
                best, label[i] = mean, cand[q]
            if dense:
                scores[cand[q], oy0 + i // cols, ox0 + i % cols] = mean
    labels[oy0:oy1, ox0:ox1] = label.reshape((rows, cols))


@njit(nogil=True, cache=True, boundscheck=False)
def _common_shift(hi, lo):
    """One softmax shift for every pixel of a tile: the largest logit bound, when no pixel's
    own largest logit (at least the largest lower bound) is more than ``COMMON_SHIFT_RANGE``
    below it, so each pixel's largest term stays far from underflow; NaN otherwise."""
    top_hi, top_lo = hi.max(), lo.max()
    return top_hi if top_hi - top_lo <= COMMON_SHIFT_RANGE else np.float32(np.nan)


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _shift_by_max(values):
    """Subtract from each pixel's classes (a row of ``values``) their largest value, as the
    softmax does (reassociated so that it vectorises: a max is a max in any order)."""
    for i in range(values.shape[0]):
        row = values[i]
        top = row[0]
        for u in range(1, len(row)):
            top = row[u] if row[u] > top else top
        for u in range(len(row)):
            row[u] -= top


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _add_probabilities(values, position, k, total):
    """Add each pixel's softmax of its candidates to ``total`` (pixels, k), ``values`` being
    each pixel's exp of every class in the denominator (summed in any order, vectorised: float32
    rounding either way, as in torch's softmax)."""
    for i in range(values.shape[0]):
        row = values[i]
        denominator = np.float32(0.0)
        for u in range(len(row)):
            denominator += row[u]
        sums = total[i]
        for q in range(k):
            sums[q] += row[position[q]] / denominator


@njit(nogil=True, cache=True, boundscheck=False)
def _exp_in_place(values, shift):
    """exp(value - shift) of a flat array whose values are at most ``shift`` (or NaN), in one
    vectorised loop."""
    for i in range(len(values)):
        values[i] = _exp_nonpositive(values[i] - shift)


# exp(x) for x <= 0 as Cephes' expf computes it (x = n ln2 + r, |r| <= ln2 / 2, a degree-7
# polynomial for exp(r), 2^n made from its bits), inlined so that the loop over it vectorises:
# NumPy's and Numba's exp is a scalar call per element here. Within 1 ulp of the correctly
# rounded value (tests/unit/test_ttamap.py checks it), as torch's own vectorised exp is. Below
# -87.3 it returns about 1e-38 instead of 0: such a term is under float32's rounding of any
# sum it joins.
_LOG2E = np.float32(1.44269504088896341)
_LN2_HIGH = np.float32(0.693359375)
_LN2_LOW = np.float32(-2.12194440e-4)
_EXP_FLOOR = np.float32(-87.3)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits``."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(nogil=True, cache=True, inline="always")
def _exp_nonpositive(x):
    x = _EXP_FLOOR if x < _EXP_FLOOR else x  # NaN passes through to the result
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HIGH - n * _LN2_LOW
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    exponent = n if n > np.float32(-126.0) else np.float32(-126.0)  # NaN: any finite value
    bits = (np.int32(exponent) + np.int32(127)) << np.int32(23)
    return p * _float32_from_bits(bits)  # type: ignore[call-arg]  # Numba supplies typingctx


@njit(nogil=True, cache=True, boundscheck=False)
def _pass_values(logits, windows, window_taps, image_taps, sizes, p, region, use, n_use):
    """Pass ``p``'s logits of classes ``use[:n_use]`` at the output ``region``, (rows, cols,
    n_use) float32, as mmseg computes them: each window's logits resized to the window, summed,
    divided by the per-pixel window count, flipped back, resized to the original; each resize
    columns first, then rows, as torch's bilinear kernel computes it."""
    values = logits[p]
    win_y, win_x = windows[0][p], windows[1][p]
    wr_lo, wr_hi, wr_w, wc_lo, wc_hi, wc_w = (
        window_taps[0][p], window_taps[1][p], window_taps[2][p],
        window_taps[3][p], window_taps[4][p], window_taps[5][p],
    )  # fmt: skip
    r_lo, r_hi, r_w, c_lo, c_hi, c_w = (
        image_taps[0][p], image_taps[1][p], image_taps[2][p],
        image_taps[3][p], image_taps[4][p], image_taps[5][p],
    )  # fmt: skip
    win_h, win_w, scaled_w, flip = sizes[p, 0], sizes[p, 1], sizes[p, 2], sizes[p, 3]
    oy0, oy1, ox0, ox1 = region
    y0, y1, x0, x1 = _pass_region(image_taps, sizes, p, region)
    merged = _merged_windows(
        values, (win_y, win_x, win_h, win_w), (wr_lo, wr_hi, wr_w, wc_lo, wc_hi, wc_w),
        (y0, y1, x0, x1), use, n_use,
    )  # fmt: skip
    one = np.float32(1.0)
    across = np.empty((y1 - y0, ox1 - ox0, n_use), np.float32)
    for x in range(ox0, ox1):
        b, b2, wb = c_lo[x], c_hi[x], c_w[x]
        if flip:  # the unflipped column b is the mirrored image's column scaled_w - 1 - b
            b, b2 = scaled_w - 1 - b, scaled_w - 1 - b2
        b, b2 = b - x0, b2 - x0
        for y in range(y1 - y0):
            for u in range(n_use):
                across[y, x - ox0, u] = (one - wb) * merged[y, b, u] + wb * merged[y, b2, u]
    out = np.empty((oy1 - oy0, ox1 - ox0, n_use), np.float32)
    for y in range(oy0, oy1):
        a, a2, wa = r_lo[y] - y0, r_hi[y] - y0, r_w[y]
        for x in range(ox1 - ox0):
            for u in range(n_use):
                out[y - oy0, x, u] = (one - wa) * across[a, x, u] + wa * across[a2, x, u]
    return out
