"""Mask encodings checked by their real readers: ``pycocotools`` (COCO's own RLE code) for RLE,
scikit-image's polygon rasteriser for the GeoJSON polygons, ``numpy.load`` for the ``.npy``."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask
from skimage import data
from skimage.draw import polygon as draw_polygon

from service.encodings import (
    MAX_POLYGON_CORNERS,
    class_polygons,
    coco_rle,
    encode_probabilities_npy,
    polygons_geojson,
)
from service.errors import PayloadTooLargeError

# pycocotools 2.0.11 still calls np.array(copy=False) on NumPy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
CLASSES = tuple(f"class{i}" for i in range(300))


@pytest.fixture(scope="module")
def photo_labels() -> np.ndarray:
    """Five regions from a photo's brightness: many components, holes and islands in holes."""
    grey = cv2.cvtColor(data.astronaut()[::4, ::4], cv2.COLOR_RGB2GRAY)  # 128x128
    return np.digitize(grey, [50, 100, 150, 200]).astype(np.uint8)


def random_maps(count: int) -> list[np.ndarray]:
    """Small label maps: pure noise, and blocky ones (3x3 cells), of odd sizes down to 1x1."""
    rng = np.random.default_rng(7)
    maps = []
    for index in range(count):
        height, width = rng.integers(1, 24, 2)
        labels = rng.integers(0, rng.integers(1, 5), (height, width)).astype(np.uint8)
        if index % 2:
            labels = np.repeat(np.repeat(labels, 3, axis=0), 3, axis=1)
        maps.append(labels)
    return maps


def rasterise(polygons: list, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside the MultiPolygon (pixel (r, c) has its centre at
    x = c + 0.5, y = r + 0.5 in the polygons' coordinates; skimage samples at integers)."""
    covered = np.zeros(shape, bool)
    for polygon in polygons:
        inside = np.zeros(shape, bool)
        for ring in polygon:
            xy = np.asarray(ring, float)
            rows, cols = draw_polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape)
            filled = np.zeros(shape, bool)
            filled[rows, cols] = True
            inside ^= filled  # holes cut out of their exterior
        covered |= inside
    return covered


def test_rle_is_cocos_own_encoding_and_decodes_to_each_class(photo_labels: np.ndarray) -> None:
    wide = (np.arange(40 * 30).reshape(30, 40) * 7 % 300).astype(np.uint16)  # ids above 255
    for labels in [photo_labels, wide, *random_maps(60)]:
        annotations = coco_rle(labels, CLASSES)
        ids, counts = np.unique(labels, return_counts=True)
        assert [a["category_id"] for a in annotations] == ids.tolist()
        assert [a["area"] for a in annotations] == counts.tolist()
        for annotation in annotations:
            pixels = labels == annotation["category_id"]
            rle = annotation["segmentation"]
            assert rle["size"] == list(labels.shape)
            expected = coco_mask.encode(np.asfortranarray(pixels.astype(np.uint8)))
            assert rle["counts"] == expected["counts"].decode()
            np.testing.assert_array_equal(coco_mask.decode(rle), pixels)
            assert annotation["name"] == CLASSES[annotation["category_id"]]


def test_polygons_cover_exactly_each_class_at_tolerance_zero(photo_labels: np.ndarray) -> None:
    for labels in [photo_labels, *random_maps(80)]:
        collection = polygons_geojson(labels, CLASSES)
        assert collection["type"] == "FeatureCollection"
        ids = np.unique(labels).tolist()
        assert [f["id"] for f in collection["features"]] == ids
        for feature in collection["features"]:
            assert feature["geometry"]["type"] == "MultiPolygon"
            polygons = feature["geometry"]["coordinates"]
            np.testing.assert_array_equal(
                rasterise(polygons, labels.shape), labels == feature["id"]
            )


def signed_area(ring: list[list[int]]) -> float:
    xy = np.asarray(ring, float)
    return float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1])) / 2


def test_polygon_holes_islands_and_winding() -> None:
    """A ring with a hole holding an island: two polygons, the first with one hole; rings closed,
    exteriors positive signed area, holes negative (RFC 7946), corners only."""
    mask = np.zeros((9, 9), bool)
    mask[1:8, 1:8] = True
    mask[3:6, 3:6] = False
    mask[4, 4] = True
    polygons = class_polygons(mask)
    assert sorted(len(p) for p in polygons) == [1, 2]
    ring, hole = next(p for p in polygons if len(p) == 2)
    assert sorted(map(tuple, ring[:-1])) == [(1, 1), (1, 8), (8, 1), (8, 8)]
    assert sorted(map(tuple, hole[:-1])) == [(3, 3), (3, 6), (6, 3), (6, 6)]
    island = next(p for p in polygons if len(p) == 1)[0]
    assert sorted(map(tuple, island[:-1])) == [(4, 4), (4, 5), (5, 4), (5, 5)]
    for polygon in polygons:
        assert all(r[0] == r[-1] for r in polygon)
        assert signed_area(polygon[0]) > 0
        assert all(signed_area(h) < 0 for h in polygon[1:])
    np.testing.assert_array_equal(rasterise(polygons, mask.shape), mask)


def test_tolerance_simplifies_and_keeps_iou(photo_labels: np.ndarray) -> None:
    smooth = cv2.resize(photo_labels[::8, ::8], (512, 512), interpolation=cv2.INTER_NEAREST)
    smooth = cv2.medianBlur(smooth, 31)  # blobs with curved edges: staircases to simplify
    exact = polygons_geojson(smooth, CLASSES)
    simple = polygons_geojson(smooth, CLASSES, tolerance=0.75)

    def vertices(collection: dict) -> int:
        return sum(
            len(r) for f in collection["features"] for p in f["geometry"]["coordinates"] for r in p
        )

    assert vertices(simple) < vertices(exact) / 2
    for feature in simple["features"]:
        truth = smooth == feature["id"]
        drawn = rasterise(feature["geometry"]["coordinates"], smooth.shape)
        assert (drawn & truth).sum() / (drawn | truth).sum() >= 0.99


def test_too_fragmented_for_polygons_is_refused_before_tracing() -> None:
    side = int(np.sqrt(MAX_POLYGON_CORNERS)) + 2
    checkerboard = (np.indices((side, side)).sum(axis=0) % 2).astype(np.uint8)
    with pytest.raises(PayloadTooLargeError, match="output=rle"):
        polygons_geojson(checkerboard, CLASSES)


def test_probabilities_npy_is_float16_chw() -> None:
    rng = np.random.default_rng(3)
    probabilities = rng.dirichlet(np.ones(5), size=(7, 9)).transpose(2, 0, 1).astype(np.float32)
    loaded = np.load(io.BytesIO(encode_probabilities_npy(probabilities)), allow_pickle=False)
    assert loaded.dtype == np.float16 and loaded.shape == (5, 7, 9)
    np.testing.assert_array_equal(loaded, probabilities.astype(np.float16))
