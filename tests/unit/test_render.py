"""Renderings of a label map, checked by decoding them with OpenCV and blending with its
``addWeighted`` (implementations we did not write)."""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest
from skimage import data

from service.render import (
    blend_overlay,
    class_statistics,
    label_counts,
    palette_array,
    palette_version,
    render_color_png,
    render_labels_png,
    render_overlay_png,
)


def _decode(payload: bytes, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(payload, np.uint8), flags)
    assert image is not None
    return image


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return data.astronaut()[::4, ::4].copy()  # 128x128 RGB


@pytest.fixture(scope="module")
def labels(photo: np.ndarray) -> np.ndarray:
    """Five regions from the photo's brightness: a label map with real structure."""
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    return np.digitize(grey, [50, 100, 150, 200]).astype(np.uint8)


def test_class_statistics_match_numpy_unique(labels: np.ndarray) -> None:
    classes = [f"class{i}" for i in range(19)]
    stats = class_statistics(labels, classes)
    ids, counts = np.unique(labels, return_counts=True)
    assert [s.id for s in stats] == ids.tolist()
    assert [s.pixels for s in stats] == counts.tolist()
    assert [s.name for s in stats] == [classes[i] for i in ids]
    assert sum(s.fraction for s in stats) == pytest.approx(1.0)
    assert stats[0].fraction == pytest.approx(counts[0] / labels.size)


@pytest.mark.parametrize("shape", [(4097, 4097), (1, (1 << 24) + 21), (300, 70)])
def test_label_counts_are_exact_past_float32_integers(shape: tuple[int, int]) -> None:
    """OpenCV's float32 histogram is exact only to 2**24 per bin: a map with more pixels of one
    label than that must still count each one (as NumPy's bincount does)."""
    labels = np.zeros(shape, np.uint8)
    labels[0, :7] = 255
    labels[-1, -3:] = 3
    expected = np.bincount(labels.ravel(), minlength=256)
    assert label_counts(labels).tolist() == expected.tolist()
    assert (
        label_counts(labels[:, 1:]).tolist()
        == np.bincount(labels[:, 1:].ravel(), minlength=256).tolist()
    )
    wide = labels.astype(np.uint16) * 200
    assert label_counts(wide).tolist() == np.bincount(wide.ravel()).tolist()


def test_class_statistics_reject_ids_beyond_the_classes(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="outside"):
        class_statistics(labels, ["a", "b"])


@pytest.mark.parametrize(
    ("num_classes", "dtype"), [(19, np.uint8), (256, np.uint8), (300, np.uint16)]
)
def test_label_png_bit_depth_follows_class_count(
    labels: np.ndarray, num_classes: int, dtype: type
) -> None:
    decoded = _decode(render_labels_png(labels, num_classes))
    assert decoded.dtype == dtype
    np.testing.assert_array_equal(decoded, labels)


def test_label_png_holds_ids_above_255() -> None:
    ids = np.arange(0, 1000, dtype=np.uint16).reshape(20, 50)
    np.testing.assert_array_equal(_decode(render_labels_png(ids, 1000)), ids)


def test_color_png_paints_each_pixel_with_its_class_colour(labels: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    palette = palette_array(rng.integers(0, 256, (19, 3)).tolist())
    rgb = cv2.cvtColor(
        _decode(render_color_png(labels, palette), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )
    np.testing.assert_array_equal(rgb, palette[labels])


def test_color_png_for_more_than_256_classes() -> None:
    rng = np.random.default_rng(4)
    palette = palette_array(rng.integers(0, 256, (300, 3)).tolist())
    ids = rng.integers(0, 300, (16, 24)).astype(np.uint16)
    rgb = cv2.cvtColor(_decode(render_color_png(ids, palette), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(rgb, palette[ids])


def test_color_png_refuses_labels_without_a_colour(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="no colour"):
        render_color_png(labels, palette_array([[0, 0, 0], [1, 1, 1]]))


def test_overlay_matches_opencv_add_weighted(photo: np.ndarray, labels: np.ndarray) -> None:
    palette = palette_array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 0, 0]])
    expected = cv2.addWeighted(photo, 0.5, palette[labels], 0.5, 0)
    blended = blend_overlay(labels, photo, palette)
    assert np.abs(blended.astype(int) - expected.astype(int)).max() <= 1  # rounding of .5 only
    decoded = cv2.cvtColor(
        _decode(render_overlay_png(labels, photo, palette), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )
    np.testing.assert_array_equal(decoded, blended)


def test_overlay_needs_matching_sizes(photo: np.ndarray, labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="differ"):
        blend_overlay(labels[:-1], photo, palette_array([[0, 0, 0]] * 5))


def test_palette_version_is_stable_and_sensitive() -> None:
    a = [[1, 2, 3], [4, 5, 6]]
    assert palette_version(a) == palette_version(tuple(tuple(c) for c in a))
    assert palette_version(a) != palette_version([[1, 2, 3], [4, 5, 7]])
    assert len(palette_version(a)) == 12


def test_overlay_blends_in_bands_with_bounded_memory() -> None:
    """The blend's float32 temporaries are a band of rows', not the photo's: blended whole, an
    overlay peaked at 48 bytes a pixel; now the uint8 result (3) and a band's temporaries (~10 at
    3 MP, ~6 at 12 MP). Same values as the whole-image formula."""
    rng = np.random.default_rng(3)
    height, width = 1500, 2000
    labels = ((np.arange(height)[:, None] // 40 + np.arange(width) // 60) % 150).astype(np.uint8)
    photo = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    palette = rng.integers(0, 256, (150, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        blended = blend_overlay(labels, photo, palette, 0.4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * height * width, peak / (height * width)
    whole = 0.6 * photo.astype(np.float32) + 0.4 * palette[labels].astype(np.float32)
    np.testing.assert_array_equal(blended, np.clip(np.rint(whole), 0, 255).astype(np.uint8))
