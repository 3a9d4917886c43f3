"""Tile-wise multi-pass labels (``service.ttamap``) against mmseg's full-plane computation.

The reference does what ``SegTTAModel`` over ``slide_inference`` / ``whole_inference`` does, in
float64 with ``F.interpolate`` / ``F.pad``: per pass, every window's logits resized to the
window, summed, divided by the window count, flipped back, resized to the original size, softmax;
then the mean over passes and its argmax. Pixels whose best two mean probabilities are within
float32 noise of each other may differ; every other pixel must match exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data, segmentation

import service.ttamap as ttamap
from service.geometry import Window, ratio_size, resize_image, window_grid
from service.ttamap import PassLogits, mean_softmax
from tests.unit.test_labelmap import noise_logits, region_logits

NOISE = 1e-5  # reference top-2 margins (mean probability) below this may go either way


class Reference(NamedTuple):
    labels: np.ndarray
    margin: np.ndarray  # best minus second-best mean probability
    probabilities: np.ndarray  # (C, H, W)


def reference(passes: list[PassLogits], original: tuple[int, int]) -> Reference:
    total = None
    for one in passes:
        height, width = one.scaled
        merged = torch.zeros((1, one.logits.shape[1], height, width), dtype=torch.float64)
        count = torch.zeros((1, 1, height, width), dtype=torch.float64)
        for w, values in zip(one.windows, one.logits, strict=True):
            crop = F.interpolate(
                torch.from_numpy(values.astype(np.float64))[None],
                size=(w.height, w.width),
                mode="bilinear",
                align_corners=False,
            )
            merged += F.pad(crop, (w.x1, width - w.x2, w.y1, height - w.y2))
            count[:, :, w.y1 : w.y2, w.x1 : w.x2] += 1
        merged /= count
        if one.flip:
            merged = merged.flip(dims=(3,))
        scores = F.interpolate(merged, size=original, mode="bilinear", align_corners=False)[0]
        probabilities = scores.softmax(dim=0)
        total = probabilities if total is None else total + probabilities
    assert total is not None
    total /= len(passes)
    top = total.topk(2, dim=0).values
    return Reference(total.argmax(dim=0).numpy(), (top[0] - top[1]).numpy(), total.numpy())


def assert_same_labels(labels: np.ndarray, expected: Reference, noise: float = NOISE) -> None:
    clear = expected.margin > noise
    assert clear.mean() > 0.99  # the comparison is not vacuous
    np.testing.assert_array_equal(labels[clear], expected.labels[clear])


def tta_passes(
    original: tuple[int, int],
    ratios: tuple[float, ...],
    crop: tuple[int, int] | None,
    stride: tuple[int, int],
    make_logits: Callable[[Window, bool, tuple[int, int]], np.ndarray],
) -> list[PassLogits]:
    """Passes as the engine plans them: each ratio of the original, unflipped and flipped,
    whole (one window) or slide windows, logits at stride 4 from ``make_logits(window, flip)``."""
    passes = []
    for ratio in ratios:
        width, height = ratio_size(original[1], original[0], ratio)
        if crop is None:
            windows = [Window(0, height, 0, width)]
        else:
            windows = window_grid(height, width, crop, stride)
        for flip in (False, True):
            logits = np.stack([make_logits(w, flip, (height, width)) for w in windows])
            passes.append(PassLogits(windows, logits, (height, width), flip))
    return passes


@pytest.mark.parametrize(
    ("original", "ratios", "crop", "stride"),
    [
        ((37, 53), (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), None, (0, 0)),  # whole, seed ratios
        ((61, 29), (0.6, 1.3), (24, 24), (16, 16)),  # portrait, odd ratios, slide
        ((50, 90), (1.0, 1.7), (40, 48), (40, 48)),  # slide, stride == crop
        ((20, 33), (0.9, 2.2), (64, 64), (48, 48)),  # image smaller than the crop
    ],
)
@pytest.mark.parametrize("probabilities", [False, True], ids=["labels-only", "probabilities"])
def test_untrained_logits_match_mmseg(
    original: tuple[int, int],
    ratios: tuple[float, ...],
    crop: tuple[int, int] | None,
    stride: tuple[int, int],
    probabilities: bool,
) -> None:
    """Every class competing everywhere: little is pruned, the exact step does the work."""
    rng = np.random.default_rng(sum(original))
    passes = tta_passes(
        original,
        ratios,
        crop,
        stride,
        lambda w, flip, scaled: noise_logits(rng, 7, (-(-w.height // 4), -(-w.width // 4))),
    )
    result = mean_softmax(passes, original, np.uint8, probabilities, tile=8, band=16)
    expected = reference(passes, original)
    assert_same_labels(result.labels, expected)
    if probabilities:
        assert result.probabilities is not None and result.probabilities.dtype == np.float32
        np.testing.assert_allclose(result.probabilities, expected.probabilities, atol=1e-6)
        assert result.exact_tiles == result.tiles
    else:
        assert result.probabilities is None


def region_passes(
    original: tuple[int, int], ratios: tuple[float, ...], crop: tuple[int, int] | None
) -> list[PassLogits]:
    """Trained-model-like logits: 150 classes, one clear winner per superpixel of a photo, seen
    by each pass through its own resize (and mirror)."""
    photo = resize_image(np.ascontiguousarray(data.astronaut()), original[1], original[0])
    regions = segmentation.slic(photo, n_segments=12, compactness=20, start_label=0)
    rng = np.random.default_rng(0)
    classes = rng.permutation(150)[: regions.max() + 1][regions].astype(np.uint8)

    def make(w: Window, flip: bool, scaled: tuple[int, int]) -> np.ndarray:
        seen = resize_image(classes[..., None].repeat(3, axis=2), scaled[1], scaled[0])
        seen = np.ascontiguousarray(seen[:, ::-1, 0] if flip else seen[..., 0])
        return region_logits(seen[w.y1 : w.y2, w.x1 : w.x2], 150, rng, stride=4)

    return tta_passes(original, ratios, crop, (85, 85), make)


def test_region_logits_match_and_skip_most_tiles() -> None:
    original = (160, 320)
    passes = region_passes(original, (0.8, 1.25), (128, 128))
    result = mean_softmax(passes, original, np.uint8)
    expected = reference(passes, original)
    assert len(np.unique(expected.labels)) >= 5
    assert_same_labels(result.labels, expected)
    # Tiles where the labels change must be computed; the bounds leave few others.
    mixed = sum(
        len(np.unique(expected.labels[y : y + 16, x : x + 16])) > 1
        for y in range(0, original[0], 16)
        for x in range(0, original[1], 16)
    )
    assert mixed <= result.exact_tiles < 1.5 * mixed
    assert result.exact_tiles < 0.4 * result.tiles


def test_random_geometries_match_mmseg() -> None:
    rng = np.random.default_rng(2027)
    for _ in range(25):
        original = (int(rng.integers(5, 70)), int(rng.integers(5, 70)))
        ratios = tuple(float(r) for r in rng.uniform(0.3, 2.0, int(rng.integers(1, 4))))
        crop = None
        stride = (0, 0)
        if rng.random() < 0.6:
            crop = (int(rng.integers(8, 48)), int(rng.integers(8, 48)))
            stride = (int(rng.integers(1, crop[0] + 1)), int(rng.integers(1, crop[1] + 1)))
        classes = int(rng.integers(2, 9))
        tile = int(rng.integers(1, 17))
        passes = tta_passes(
            original,
            ratios,
            crop,
            stride,
            lambda w, flip, scaled, c=classes: noise_logits(
                rng, c, (-(-w.height // 4), -(-w.width // 4))
            ),
        )
        labels = mean_softmax(
            passes, original, np.uint8, tile=tile, band=int(rng.integers(tile, 3 * tile + 1))
        ).labels
        assert_same_labels(labels, reference(passes, original))


def test_kernel_indexes_in_bounds_on_random_geometries(tmp_path: Path) -> None:
    """The kernel runs without bounds checks; with Numba's checks forced on, the same random
    geometries must run clean (an out-of-range index raises instead of corrupting memory)."""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path))
    test = f"{__file__}::test_random_geometries_match_mmseg"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout


def test_a_narrow_winner_is_kept() -> None:
    """A class ahead by a hair in the mean probability, where it wins, must survive pruning."""
    original = (48, 64)

    def make(w: Window, flip: bool, scaled: tuple[int, int]) -> np.ndarray:
        values = np.full((3, -(-w.height // 4), -(-w.width // 4)), -3.0, np.float32)
        values[0] = 1.0
        cols = 4 * np.arange(values.shape[2])[None, :] + 2
        cols = scaled[1] - 1 - cols if flip else cols
        inside = (cols >= scaled[1] // 4) & (cols < scaled[1] // 2)
        values[1] = np.where(inside, 1.002, -3.0)
        return values

    passes = tta_passes(original, (1.0, 1.5), None, (0, 0), make)
    result = mean_softmax(passes, original, np.uint8, tile=8, band=16)
    expected = reference(passes, original)
    assert (expected.labels == 1).sum() > 50
    assert_same_labels(result.labels, expected)


def test_exact_ties_keep_the_first_class() -> None:
    rng = np.random.default_rng(5)

    def make(w: Window, flip: bool, scaled: tuple[int, int]) -> np.ndarray:
        values = noise_logits(rng, 6, (-(-w.height // 4), -(-w.width // 4)))
        values[4] = values[1] = values.max(axis=0) + 1.0  # classes 1 and 4 tie, above the rest
        return values

    passes = tta_passes((30, 41), (0.8, 1.2), (16, 16), (12, 12), make)
    assert (mean_softmax(passes, (30, 41), np.uint8, tile=8).labels == 1).all()


def test_nan_logits_give_labels_not_an_error() -> None:
    """A broken model (fp16 overflow, say) must not turn into a server error here."""
    rng = np.random.default_rng(9)
    passes = tta_passes(
        (30, 41),
        (1.0,),
        (16, 16),
        (12, 12),
        lambda w, flip, scaled: noise_logits(rng, 5, (4, 4)),
    )
    passes[1].logits[1, :, 1:3, 0:2] = np.nan
    labels = mean_softmax(passes, (30, 41), np.uint8, tile=8).labels
    assert labels.shape == (30, 41) and int(labels.max()) < 5


def test_many_classes_give_uint16_labels() -> None:
    rng = np.random.default_rng(3)
    passes = tta_passes(
        (33, 50),
        (0.7, 1.0),
        None,
        (0, 0),
        lambda w, flip, scaled: noise_logits(rng, 300, (-(-w.height // 4), -(-w.width // 4))),
    )
    result = mean_softmax(passes, (33, 50), np.uint16)
    expected = reference(passes, (33, 50))
    assert result.labels.dtype == np.uint16 and expected.labels.max() > 255
    assert_same_labels(result.labels, expected, noise=1e-7)  # probabilities near 1/300


def test_warm_up_compiles_everything_requests_use() -> None:
    """A request must never wait for a compile: after ``warm_up``, whole and slide passes,
    flips, labels only or with probabilities, and either label dtype reuse its machine code."""
    ttamap.warm_up()
    compiled = set(ttamap._mean_softmax_bands.signatures)
    assert len(compiled) == 2  # uint8 and uint16 labels
    rng = np.random.default_rng(1)
    passes = tta_passes(
        (30, 41),
        (0.5, 1.3),
        (16, 16),
        (12, 12),
        lambda w, flip, scaled: noise_logits(rng, 5, (4, 4)),
    )
    mean_softmax(passes, (30, 41), np.uint8)
    mean_softmax(passes[:3], (30, 41), np.uint16, probabilities=True)
    assert set(ttamap._mean_softmax_bands.signatures) == compiled


def test_vectorised_exp_is_within_one_ulp() -> None:
    """The kernel's own exp against float64's, on one float32 in three of [-87, 0] (23 million
    values), NaN kept; the shift is subtracted first, as the kernel does."""
    first, last = np.float32(-0.0).view(np.uint32), np.float32(-87.0).view(np.uint32)
    worst = 0.0
    for start in range(int(first), int(last) + 1, 3 << 22):
        bits = np.arange(start, min(start + (3 << 22), int(last) + 1), 3, dtype=np.uint32)
        values = bits.view(np.float32) + np.float32(2.0)
        ours = values.copy()
        ttamap._exp_in_place(ours, np.float32(2.0))
        exact = np.exp((values - np.float32(2.0)).astype(np.float64))
        ulps = np.abs(ours - exact) / np.spacing(exact.astype(np.float32))
        worst = max(worst, float(ulps.max()))
    assert worst <= 1.0
    special = np.array([np.nan, -200.0, 0.0], np.float32)
    ttamap._exp_in_place(special, np.float32(0.0))
    assert np.isnan(special[0]) and 0 <= special[1] < 2e-38 and special[2] == 1.0


def test_logits_spread_wider_than_one_shift_allows() -> None:
    """Confident logits (margins over 200) that change class within a tile: one shift for the whole
    tile would underflow every term of some pixels, so those tiles shift pixel by pixel."""
    original = (96, 160)
    passes = [
        PassLogits(p.windows, 40 * p.logits, p.scaled, p.flip)
        for p in region_passes(original, (0.8, 1.25), None)
    ]
    result = mean_softmax(passes, original, np.uint8)
    expected = reference(passes, original)
    clear = expected.margin > NOISE  # where two passes each disagree with the other two: ties
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(result.labels[clear], expected.labels[clear])
