"""Geometry helpers against mmcv's published arithmetic, PyTorch's interpolate and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.geometry import (
    Window,
    argmax_planes,
    grid_count,
    labels_dtype,
    planes_to_original,
    ratio_size,
    rescale_size,
    resize_image,
    resize_plane,
    softmax,
    window_counts,
    window_grid,
)


@pytest.mark.parametrize(
    ("size", "scale", "expected"),
    [
        # ADE20K test scale (2048, 512): the short edge goes to 512 unless the long one hits 2048.
        ((683, 512), (2048, 512), (683, 512)),
        ((640, 427), (2048, 512), (767, 512)),  # 640 * 512/427 = 767.4 -> 767
        ((451, 300), (2048, 512), (770, 512)),  # 451 * 1.70667 = 769.7 -> 770 (round half up)
        ((4000, 500), (2048, 512), (2048, 256)),  # the long edge limits: factor 0.512
        # Cityscapes (2048, 1024) on its native size is the identity.
        ((2048, 1024), (2048, 1024), (2048, 1024)),
        ((1024, 2048), (2048, 1024), (1024, 2048)),  # portrait: edges, not width/height
    ],
)
def test_rescale_size_matches_mmcv(
    size: tuple[int, int], scale: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert rescale_size(*size, scale) == expected


def test_ratio_size_is_two_step_like_mmcv_resize() -> None:
    # Resize(scale_factor=0.75): (int(451*.75+.5), int(300*.75+.5)) = (338, 225), then imrescale
    # to that size: factor min(338/451, 225/300) = 0.7494..., giving (338, 225).
    assert ratio_size(451, 300, 0.75) == (338, 225)
    # 0.5 on odd sides rounds half up: 225.5 -> 226, 150 -> 150.
    assert ratio_size(451, 300, 0.5) == (226, 150)
    # A case where the second step changes a side: 101 x 33 at 1.5 -> (152, 50), then
    # factor min(152/101, 50/33) = 1.50495 -> (int(152.0+.5), int(49.66+.5)) = (152, 50).
    assert ratio_size(101, 33, 1.5) == (152, 50)
    assert ratio_size(7, 3, 0.5) == (4, 2)


@pytest.mark.parametrize(
    ("height", "width", "crop", "stride"),
    [
        (512, 683, (512, 512), (341, 341)),
        (1024, 2048, (1024, 1024), (768, 768)),
        (100, 90, (64, 48), (50, 40)),
        (30, 500, (64, 64), (64, 64)),  # image shorter than the crop along one axis
        (10, 10, (96, 96), (64, 64)),  # smaller than the crop: one window, the whole image
    ],
)
def test_window_grid_covers_image_like_mmseg(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> None:
    windows = window_grid(height, width, crop, stride)
    rows = grid_count(height, crop[0], stride[0])
    cols = grid_count(width, crop[1], stride[1])
    assert len(windows) == rows * cols
    for window in windows:
        assert 0 <= window.y1 < window.y2 <= height and 0 <= window.x1 < window.x2 <= width
        assert window.height == min(crop[0], height) and window.width == min(crop[1], width)
    counts = window_counts(height, width, windows)
    assert counts.min() >= 1  # every pixel covered: mmseg asserts count_mat has no zeros
    assert counts.sum() == sum(w.height * w.width for w in windows)
    # The last window of each axis ends exactly at the image edge (clamping).
    assert max(w.y2 for w in windows) == height and max(w.x2 for w in windows) == width


def test_window_grid_exact_positions() -> None:
    # 100 rows, crop 64, stride 50: grids = (100-64+49)//50+1 = 2; second window 50..114 is
    # clamped to 36..100.
    assert window_grid(100, 64, (64, 64), (50, 50)) == [
        Window(0, 64, 0, 64),
        Window(36, 100, 0, 64),
    ]


def torch_resize(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What mmseg's ``resize`` does: F.interpolate bilinear, align_corners False."""
    tensor = torch.from_numpy(np.ascontiguousarray(scores))[None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0].numpy()


@pytest.mark.parametrize(
    ("src", "dst"),
    [((17, 23), (68, 92)), ((128, 171), (512, 683)), ((40, 30), (13, 11)), ((5, 9), (5, 20))],
)
def test_resize_plane_matches_torch_interpolate(src: tuple[int, int], dst: tuple[int, int]) -> None:
    scores = np.random.default_rng(0).normal(size=(7, *src)).astype(np.float32)
    ours = np.stack([resize_plane(plane, *dst) for plane in scores])
    assert ours.shape == (7, *dst) and ours.dtype == np.float32
    # Both sides compute source coordinates in float32 with different rounding: ~3e-5 apart.
    np.testing.assert_allclose(ours, torch_resize(scores, dst), atol=1e-4)


def test_planes_to_original_resizes_flips_back_and_resizes_like_mmseg() -> None:
    logits = np.random.default_rng(1).normal(size=(4, 9, 13)).astype(np.float32)
    planes = list(planes_to_original(logits, (36, 52), flip=True, original=(50, 70)))
    expected = torch_resize(torch_resize(logits, (36, 52))[:, :, ::-1], (50, 70))
    np.testing.assert_allclose(np.stack(planes), expected, atol=1e-4)


def test_argmax_planes_streams_like_argmax_with_first_index_on_ties() -> None:
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 4, size=(300, 6, 7)).astype(np.float32)  # many ties
    labels = argmax_planes(iter(scores), np.uint16)
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, torch.from_numpy(scores).argmax(dim=0).numpy())
    np.testing.assert_array_equal(labels, scores.argmax(axis=0))
    with pytest.raises(ValueError, match="no score planes"):
        argmax_planes(iter([]))


def test_resize_image_is_bilinear_without_antialias(photos: dict[str, np.ndarray]) -> None:
    """Downscaling by 4 samples 2 source pixels per axis (bilinear), not a 4x4 box average."""
    image = photos["astronaut"]  # 512 x 512
    small = resize_image(image, 128, 128).astype(np.float32)
    # half-pixel centres: dst i -> src 4i + 1.5, i.e. the mean of source pixels 4i+1 and 4i+2.
    src = image.astype(np.float32)
    expected = (src[1::4, 1::4] + src[1::4, 2::4] + src[2::4, 1::4] + src[2::4, 2::4]) / 4.0
    assert np.abs(small - expected).max() <= 1.0  # OpenCV's fixed-point rounding on uint8
    box = src.reshape(128, 4, 128, 4, 3).mean(axis=(1, 3))
    assert np.abs(small - box).mean() > 1.0  # an antialiased resize would be close to this


def test_softmax_and_label_dtype() -> None:
    scores = np.random.default_rng(3).normal(size=(5, 4, 3)).astype(np.float32) * 30
    expected = torch.from_numpy(scores).softmax(dim=0).numpy()
    np.testing.assert_allclose(softmax(scores.copy()), expected, rtol=1e-5, atol=1e-7)
    assert labels_dtype(150) is np.uint8
    assert labels_dtype(256) is np.uint8
    assert labels_dtype(257) is np.uint16
