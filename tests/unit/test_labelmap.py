"""Tile-wise labels of one pass (``service.labelmap``) against mmseg's full-plane computation.

The reference resizes every window's logits with ``F.interpolate``, pads and sums them, divides
by the window count and resizes to the original size in float64, as mmseg's
``slide_inference`` and ``postprocess_result`` do. Pixels whose best two classes are within
float32 noise of each other may differ; every other pixel must match exactly.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data, segmentation

import service.labelmap as labelmap
from service.geometry import Window, resize_image, window_grid
from service.labelmap import axis_taps, pass_labels

NOISE = 1e-4  # reference top-2 margins below this may go either way in float32


def reference(
    windows: list[Window],
    logits: list[np.ndarray],
    scaled: tuple[int, int],
    original: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, top-2 margin) of mmseg's computation in float64."""
    height, width = scaled
    total = torch.zeros((1, logits[0].shape[0], height, width), dtype=torch.float64)
    count = torch.zeros((1, 1, height, width), dtype=torch.float64)
    for w, values in zip(windows, logits, strict=True):
        crop = F.interpolate(
            torch.from_numpy(values.astype(np.float64))[None],
            size=(w.height, w.width),
            mode="bilinear",
            align_corners=False,
        )
        total += F.pad(crop, (w.x1, width - w.x2, w.y1, height - w.y2))
        count[:, :, w.y1 : w.y2, w.x1 : w.x2] += 1
    total /= count
    scores = F.interpolate(total, size=original, mode="bilinear", align_corners=False)[0]
    top = scores.topk(2, dim=0).values
    return scores.argmax(dim=0).numpy(), (top[0] - top[1]).numpy()


def assert_same_labels(labels: np.ndarray, expected: np.ndarray, margin: np.ndarray) -> None:
    clear = margin > NOISE
    assert clear.mean() > 0.99  # the comparison is not vacuous
    np.testing.assert_array_equal(labels[clear], expected[clear])


def noise_logits(rng: np.random.Generator, classes: int, shape: tuple[int, int]) -> np.ndarray:
    """Untrained-model-like logits: every class competes everywhere."""
    values = rng.standard_normal((classes, *shape)).astype(np.float32)
    return np.stack([cv2.GaussianBlur(plane, (0, 0), 1.0) for plane in values])


def region_logits(
    classes: np.ndarray, num_classes: int, rng: np.random.Generator, stride: int
) -> np.ndarray:
    """Trained-model-like logits at 1/stride of a class map: one clear winner per region."""
    small = classes[::stride, ::stride]
    values = 0.3 * rng.standard_normal((num_classes, *small.shape)).astype(np.float32)
    values[small[None] == np.arange(num_classes)[:, None, None]] += 6.0
    return np.stack([cv2.GaussianBlur(plane, (0, 0), 1.0) for plane in values])


@pytest.mark.parametrize(("source", "destination"), [(7, 29), (32, 128), (50, 50), (40, 17)])
def test_axis_taps_are_torch_bilinear(source: int, destination: int) -> None:
    values = np.random.default_rng(source).standard_normal((3, source)).astype(np.float32)
    taps = axis_taps(source, destination)
    ours = (1 - taps.weight) * values[:, taps.low] + taps.weight * values[:, taps.high]
    theirs = F.interpolate(
        torch.from_numpy(values)[None, :, :, None],
        size=(destination, 1),
        mode="bilinear",
        align_corners=False,
    )[0, :, :, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert (taps.low >= 0).all() and (taps.high < source).all()


@pytest.mark.parametrize(
    ("scaled", "original", "crop", "stride", "tile", "band"),
    [
        ((96, 160), (192, 320), (64, 64), (40, 40), 16, 64),  # overlapping, exact 2x
        ((96, 160), (150, 251), (64, 64), (40, 48), 16, 32),  # non-integer ratio, ragged edges
        ((90, 130), (61, 83), (48, 64), (48, 64), 5, 16),  # no overlap, downsampling
        ((50, 70), (120, 150), (64, 96), (32, 32), 8, 8),  # image smaller than the crop
        ((101, 77), (101, 77), (64, 64), (21, 13), 200, 200),  # many windows, one tile
        ((96, 160), (96, 160), (64, 64), (40, 40), 16, 32),  # same size: no last resize
    ],
)
def test_untrained_logits_match_mmseg(
    scaled: tuple[int, int],
    original: tuple[int, int],
    crop: tuple[int, int],
    stride: tuple[int, int],
    tile: int,
    band: int,
) -> None:
    rng = np.random.default_rng(sum(scaled) + tile)
    windows = window_grid(*scaled, crop, stride)
    logits = [noise_logits(rng, 19, ((w.height + 3) // 4, (w.width + 3) // 4)) for w in windows]
    labels = pass_labels(windows, logits, scaled, original, np.uint8, tile=tile, band=band).labels
    assert labels.shape == original and labels.dtype == np.uint8
    expected, margin = reference(windows, logits, scaled, original)
    assert len(np.unique(expected)) > 10
    assert_same_labels(labels, expected, margin)


class Case(NamedTuple):
    scaled: tuple[int, int]
    original: tuple[int, int]
    windows: list[Window]
    logits: list[np.ndarray]
    tile: int
    band: int


def random_case(rng: np.random.Generator) -> Case:
    """Any sizes mmseg allows: crops larger or smaller than the image, strides down to a third
    of the crop, up- or downsampling to the original, logits at 1/1 to 1/8 of a window or even
    larger than it, tiles and bands of any size."""
    scaled = (int(rng.integers(6, 120)), int(rng.integers(6, 120)))
    crop = (int(rng.integers(6, 90)), int(rng.integers(6, 90)))
    stride = (int(rng.integers(max(crop[0] // 3, 1), crop[0] + 1)),
              int(rng.integers(max(crop[1] // 3, 1), crop[1] + 1)))  # fmt: skip
    windows = window_grid(*scaled, crop, stride)
    reduction = float(rng.choice([0.5, 1, 2, 3, 4, 8]))
    shape = (
        max(round(windows[0].height / reduction), 1),
        max(round(windows[0].width / reduction), 1),
    )
    classes = int(rng.integers(2, 40))
    tile = int(rng.integers(1, 24))
    return Case(
        scaled=scaled,
        original=(int(rng.integers(3, 200)), int(rng.integers(3, 200))),
        windows=windows,
        logits=[noise_logits(rng, classes, shape) for _ in windows],
        tile=tile,
        band=int(rng.integers(tile, 3 * tile + 1)),
    )


def test_random_geometries_match_mmseg() -> None:
    rng = np.random.default_rng(2026)
    for _ in range(60):
        case = random_case(rng)
        labels = pass_labels(
            case.windows, case.logits, case.scaled, case.original, np.uint8, case.tile, case.band
        ).labels
        expected, margin = reference(case.windows, case.logits, case.scaled, case.original)
        assert_same_labels(labels, expected, margin)


def test_kernel_indexes_in_bounds_on_random_geometries(tmp_path: Path) -> None:
    """The kernel runs without bounds checks; with Numba's checks forced on, the same random
    geometries (slide and whole mode) must run clean (an out-of-range index raises instead of
    corrupting memory)."""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path))
    tests = [
        f"{__file__}::test_random_geometries_match_mmseg",
        f"{__file__}::test_random_whole_mode_geometries_match_mmseg",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 passed" in result.stdout


def test_a_narrow_winner_is_kept() -> None:
    """A class ahead by a hair where it wins must survive the pruning (bounds are exact)."""
    windows = window_grid(64, 96, (48, 48), (24, 24))
    logits = []
    for w in windows:
        values = np.zeros((3, w.height // 4, w.width // 4), np.float32)
        values[0] = 1.0
        values[2] = -1.0
        rows = w.y1 + 4 * np.arange(values.shape[1])[:, None] + 2  # resized-image centres
        cols = w.x1 + 4 * np.arange(values.shape[2])[None, :] + 2
        inside = (rows >= 16) & (rows < 48) & (cols >= 30) & (cols < 70)
        values[1] = np.where(inside, 1.004, -1.0)  # ahead of class 0 by a hair inside only
        logits.append(values)
    labels = pass_labels(windows, logits, (64, 96), (130, 190), np.uint8, tile=16, band=32).labels
    expected, margin = reference(windows, logits, (64, 96), (130, 190))
    assert (expected == 1).sum() > 100
    clear = margin > NOISE
    np.testing.assert_array_equal(labels[clear], expected[clear])


@pytest.mark.parametrize("original", [(333, 500), (120, 164), (71, 90)])
def test_single_window_is_whole_mode(original: tuple[int, int]) -> None:
    """One window covering the image: exact labels cell by cell, through a last resize up, none
    (the image is at test scale) or down."""
    rng = np.random.default_rng(3)
    logits = [noise_logits(rng, 300, (30, 41))]
    windows = [Window(0, 120, 0, 164)]
    labels = pass_labels(windows, logits, (120, 164), original, np.uint16, tile=16, band=48).labels
    assert labels.dtype == np.uint16
    expected, margin = reference(windows, logits, (120, 164), original)
    assert expected.max() > 255
    assert_same_labels(labels, expected, margin)


def test_region_logits_match_and_skip_most_tiles() -> None:
    photo = resize_image(np.ascontiguousarray(data.astronaut()), 400, 200)
    regions = segmentation.slic(photo, n_segments=12, compactness=20, start_label=0)
    rng = np.random.default_rng(0)
    classes = rng.permutation(150)[: regions.max() + 1][regions]
    windows = window_grid(200, 400, (128, 128), (85, 85))
    logits = [region_logits(classes[w.y1 : w.y2, w.x1 : w.x2], 150, rng, stride=4) for w in windows]
    labels, exact_tiles = pass_labels(
        windows, logits, (200, 400), (400, 800), np.uint8, tile=16, band=32
    )
    expected, margin = reference(windows, logits, (200, 400), (400, 800))
    assert len(np.unique(expected)) >= 5
    assert_same_labels(labels, expected, margin)
    assert 0 < exact_tiles < 0.3 * (400 // 16) * (800 // 16)  # most tiles: no arithmetic


@pytest.mark.parametrize("crop", [(48, 48), (64, 96)])  # slide, whole
def test_exact_ties_keep_the_first_class(crop: tuple[int, int]) -> None:
    rng = np.random.default_rng(5)
    windows = window_grid(64, 96, crop, (32, 32))
    logits = []
    for w in windows:
        values = noise_logits(rng, 6, (w.height // 4, w.width // 4))
        values[4] = values[1] = values.max(axis=0) + 1.0  # classes 1 and 4 tie, above the rest
        logits.append(values)
    labels = pass_labels(windows, logits, (64, 96), (130, 190), np.uint8, tile=16).labels
    assert (labels == 1).all()


@pytest.mark.parametrize("crop", [(48, 48), (64, 96)])  # slide, whole
def test_nan_logits_give_labels_not_an_error(crop: tuple[int, int]) -> None:
    """A broken model (fp16 overflow, say) must not turn into a server error here."""
    rng = np.random.default_rng(9)
    windows = window_grid(64, 96, crop, (32, 32))
    logits = [noise_logits(rng, 5, (w.height // 4, w.width // 4)) for w in windows]
    logits[-1][:, 2:6, 3:8] = np.nan
    labels = pass_labels(windows, logits, (64, 96), (130, 190), np.uint8, tile=16).labels
    assert labels.shape == (130, 190) and int(labels.max()) < 5


def test_warm_up_compiles_everything_requests_use() -> None:
    """A request must never wait for a compile: after ``warm_up``, lists of windows, a stacked
    array, a single window and either label dtype all reuse the warm-up's machine code."""
    labelmap.warm_up()
    compiled = set(labelmap._label_bands.signatures)
    assert len(compiled) == 2  # uint8 and uint16 labels
    rng = np.random.default_rng(1)
    windows = window_grid(64, 96, (48, 48), (32, 32))
    logits = [noise_logits(rng, 5, (12, 12)) for _ in windows]
    pass_labels(windows, logits, (64, 96), (130, 190), np.uint8)
    pass_labels(windows, np.stack(logits), (64, 96), (130, 190), np.uint16)
    pass_labels(
        [Window(0, 64, 0, 96)], noise_logits(rng, 5, (16, 24))[None], (64, 96), (9, 9), np.uint8
    )
    assert set(labelmap._label_bands.signatures) == compiled


def test_random_whole_mode_geometries_match_mmseg() -> None:
    """One window covering the image at random sizes: cells of 1x1 to 3x3 logits, tiles cut at
    cell starts, last resize up, down or none."""
    rng = np.random.default_rng(77)
    for _ in range(40):
        scaled = (int(rng.integers(6, 120)), int(rng.integers(6, 120)))
        original = (
            scaled if rng.random() < 0.3 else (int(rng.integers(3, 200)), int(rng.integers(3, 200)))
        )
        reduction = float(rng.choice([0.5, 1, 2, 3, 4, 8]))
        shape = (max(round(scaled[0] / reduction), 1), max(round(scaled[1] / reduction), 1))
        logits = [noise_logits(rng, int(rng.integers(2, 40)), shape)]
        windows = [Window(0, scaled[0], 0, scaled[1])]
        tile = int(rng.integers(1, 24))
        labels = pass_labels(windows, logits, scaled, original, np.uint8, tile, 2 * tile).labels
        expected, margin = reference(windows, logits, scaled, original)
        assert_same_labels(labels, expected, margin)


def test_cells_through_both_resizes_share_their_first_logit() -> None:
    window, image = axis_taps(128, 512), axis_taps(512, 480)  # a 640x480 photo at 683x512
    first = window.low[image.low]
    starts = labelmap.cell_starts(image, window, same_size=False)
    assert (np.diff(first)[starts[1:] - 1] > 0).all() and len(starts) == len(set(first))
    cuts = labelmap.tile_cuts(starts, 480, 16)
    assert set(cuts[:-1]) <= set(starts.tolist()) and (np.diff(cuts) <= 16).all()


@pytest.mark.parametrize(("source", "destination"), [(128, 512), (30, 120), (41, 500), (90, 61)])
def test_whole_mode_tiles_are_whole_cells(source: int, destination: int) -> None:
    taps = axis_taps(source, destination)
    identity = axis_taps(destination, destination)
    starts = labelmap.cell_starts(identity, taps, same_size=True)
    reads = list(zip(taps.low, taps.high, strict=True))
    assert all(reads[s] != reads[s - 1] for s in starts[1:])  # a start is where reads change
    assert len(starts) == len(set(reads))
    cuts = labelmap.tile_cuts(starts, destination, 16)
    assert cuts[0] == 0 and cuts[-1] == destination and (np.diff(cuts) > 0).all()
    assert set(cuts[:-1]) <= set(starts.tolist())
    assert (np.diff(cuts) <= 16).all()


@pytest.mark.parametrize(("bands", "shares"), [(1, 4), (3, 4), (17, 4), (94, 4), (200, 16)])
def test_guided_pieces_cover_the_bands_in_shrinking_shares(bands: int, shares: int) -> None:
    pieces = labelmap._guided_pieces(bands, shares)
    assert pieces[0][0] == 0 and pieces[-1][1] == bands
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))  # contiguous, no overlap
    sizes = [last - first for first, last in pieces]
    assert min(sizes) == 1 and sizes == sorted(sizes, reverse=True)
    assert sizes[0] == -(-bands // shares)  # the first a full share: few pieces on large images
