"""Tile-wise labels of one pass (``service.labelmap``) against mmseg's full-plane computation.

The reference resizes every window's logits with ``F.interpolate``, pads and sums them, divides
by the window count, flips back and resizes to the original size in float64, as mmseg's
``slide_inference`` and ``postprocess_result`` do. Pixels whose best two classes are within
float32 noise of each other may differ; every other pixel must match exactly.
"""

from __future__ import annotations

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
    flip: bool,
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
    if flip:
        total = total.flip(dims=(3,))
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
    ours = values @ taps.matrix(0, destination, 0, source).T
    theirs = F.interpolate(
        torch.from_numpy(values)[None, :, :, None],
        size=(destination, 1),
        mode="bilinear",
        align_corners=False,
    )[0, :, :, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    low, high = taps.range_of(3, destination - 2)
    assert 0 <= low <= high <= source


@pytest.mark.parametrize(
    ("scaled", "original", "crop", "stride", "flip", "tile"),
    [
        ((96, 160), (192, 320), (64, 64), (40, 40), False, 64),  # overlapping, exact 2x
        ((96, 160), (150, 251), (64, 64), (40, 48), True, 32),  # non-integer ratio, flipped
        ((90, 130), (61, 83), (48, 64), (48, 64), False, 16),  # no overlap, downsampling
        ((50, 70), (120, 150), (64, 96), (32, 32), False, 8),  # image smaller than the crop
        ((101, 77), (101, 77), (64, 64), (21, 13), False, 200),  # many windows, one tile
    ],
)
def test_untrained_logits_match_mmseg(
    scaled: tuple[int, int],
    original: tuple[int, int],
    crop: tuple[int, int],
    stride: tuple[int, int],
    flip: bool,
    tile: int,
) -> None:
    rng = np.random.default_rng(sum(scaled) + tile)
    windows = window_grid(*scaled, crop, stride)
    logits = [noise_logits(rng, 19, ((w.height + 3) // 4, (w.width + 3) // 4)) for w in windows]
    labels = pass_labels(windows, logits, scaled, flip, original, np.uint8, tile=tile)
    assert labels.shape == original and labels.dtype == np.uint8
    expected, margin = reference(windows, logits, scaled, flip, original)
    assert len(np.unique(expected)) > 10
    assert_same_labels(labels, expected, margin)


def test_single_window_is_whole_mode() -> None:
    rng = np.random.default_rng(3)
    logits = [noise_logits(rng, 300, (30, 41))]
    windows = [Window(0, 120, 0, 164)]
    labels = pass_labels(windows, logits, (120, 164), False, (333, 500), np.uint16, tile=48)
    assert labels.dtype == np.uint16
    expected, margin = reference(windows, logits, (120, 164), False, (333, 500))
    assert expected.max() > 255
    assert_same_labels(labels, expected, margin)


def test_region_logits_match_and_skip_most_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    photo = resize_image(np.ascontiguousarray(data.astronaut()), 400, 200)
    regions = segmentation.slic(photo, n_segments=12, compactness=20, start_label=0)
    rng = np.random.default_rng(0)
    classes = rng.permutation(150)[: regions.max() + 1][regions]
    windows = window_grid(200, 400, (128, 128), (85, 85))
    logits = [region_logits(classes[w.y1 : w.y2, w.x1 : w.x2], 150, rng, stride=4) for w in windows]
    exact_tiles = []
    tile_labels = labelmap._tile_labels

    def counted(*args: object) -> object:
        exact_tiles.append(args[3])
        return tile_labels(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(labelmap, "_tile_labels", counted)
    labels = pass_labels(windows, logits, (200, 400), False, (400, 800), np.uint8, tile=32)
    expected, margin = reference(windows, logits, (200, 400), False, (400, 800))
    assert len(np.unique(expected)) >= 5
    assert_same_labels(labels, expected, margin)
    assert 0 < len(exact_tiles) < 0.5 * (400 // 32 + 1) * (800 // 32)  # most tiles: no arithmetic


def test_exact_ties_keep_the_first_class() -> None:
    rng = np.random.default_rng(5)
    windows = window_grid(64, 96, (48, 48), (32, 32))
    logits = []
    for w in windows:
        values = noise_logits(rng, 6, (w.height // 4, w.width // 4))
        values[4] = values[1] = values.max(axis=0) + 1.0  # classes 1 and 4 tie, above the rest
        logits.append(values)
    labels = pass_labels(windows, logits, (64, 96), False, (130, 190), np.uint8, tile=16)
    assert (labels == 1).all()


def test_nan_logits_give_labels_not_an_error() -> None:
    """A broken model (fp16 overflow, say) must not turn into a server error here."""
    rng = np.random.default_rng(9)
    windows = window_grid(64, 96, (48, 48), (32, 32))
    logits = [noise_logits(rng, 5, (w.height // 4, w.width // 4)) for w in windows]
    logits[1][:, 2:6, 3:8] = np.nan
    labels = pass_labels(windows, logits, (64, 96), False, (130, 190), np.uint8, tile=16)
    assert labels.shape == (130, 190) and int(labels.max()) < 5
