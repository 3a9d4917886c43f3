"""Mask encodings checked by their real readers: ``pycocotools`` (COCO's own RLE code) for RLE,
scikit-image's polygon rasteriser for the GeoJSON polygons, ``numpy.load`` for the ``.npy``."""

from __future__ import annotations

import io
import json
import tracemalloc

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask
from shapely.geometry import shape
from shapely.validation import explain_validity
from skimage import data
from skimage.draw import polygon as draw_polygon

from benchmarks.encoding_memory import label_map
from service import encodings
from service.encodings import (
    MAX_POLYGON_CORNERS,
    class_polygons,
    coco_rle,
    encode_polygons_json,
    encode_probabilities_npy,
    encode_rle_json,
    encoding_bytes,
    polygon_corners,
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


def test_rle_json_is_cocos_strings_in_compact_json_whatever_the_band(
    photo_labels: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body, byte for byte, is json.dumps of pycocotools' own strings, with runs crossing the
    encoder's bands (down to one column at a time) and JSON escapes (names, and the backslash
    that is one of RLE's 64 characters: long gaps in a 16-bit noise map write it)."""
    rng = np.random.default_rng(11)
    noise = rng.integers(0, 5000, (60, 70)).astype(np.uint16)
    names = tuple(f'class "{i}" \\ é' for i in range(5000))
    backslash = np.zeros((1, 100), np.uint8)
    backslash[0, 44] = 1  # a first count of 44 is written "\\" and "0"
    maps = [photo_labels, noise, backslash, np.zeros((1, 1), np.uint8)]
    maps += [np.full((3, 200), 9, np.uint8)]
    maps += random_maps(30)
    for band in (1, 7, 100, encodings.RLE_BAND_PIXELS):
        monkeypatch.setattr(encodings, "RLE_BAND_PIXELS", band)
        for labels in maps:
            height, width = labels.shape
            annotations = []
            for class_id, area in zip(*np.unique(labels, return_counts=True), strict=True):
                pixels = np.asfortranarray((labels == class_id).astype(np.uint8))
                counts = coco_mask.encode(pixels)["counts"].decode()
                annotations.append(
                    {
                        "category_id": int(class_id),
                        "name": names[class_id],
                        "area": int(area),
                        "segmentation": {"size": [height, width], "counts": counts},
                    }
                )
            body = {"model": 'm"x', "width": width, "height": height, "annotations": annotations}
            expected = json.dumps(body, separators=(",", ":")).encode()
            assert bytes(encode_rle_json(labels, names, 'm"x')) == expected
            if labels is backslash:
                assert annotations[1]["segmentation"]["counts"].startswith("\\")
            assert coco_rle(labels, names) == annotations


def traced_peak(function: object, *args: object) -> int:
    assert callable(function)
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("classes", "side"),
    [(2, 1500), (8, 1500), (150, 1500), (300, 1000), (8, 300), (300, 300)],  # 300: 16-bit
)
def test_rle_memory_stays_under_what_is_held(classes: int, side: int) -> None:
    """Uniform noise, every pixel nearly its own run: the encoder's traced peak is within
    ``encoding_bytes`` (12 bytes a pixel a label byte and one band's scratch, most of what a
    small map takes). The encoder before the banded one peaked at 45 (8 classes), 60 (2) and 54
    (300) bytes a pixel, over it."""
    dtype = np.uint8 if classes <= 256 else np.uint16
    labels = np.random.default_rng(classes).integers(0, classes, (side, side), dtype=dtype)
    peak = traced_peak(encode_rle_json, labels, CLASSES, "m")
    held = encoding_bytes("rle", side, side, labels.itemsize)
    assert peak < held, (peak / labels.size, held / labels.size)
    assert held == encodings.RLE_BYTES_PER_PIXEL * labels.nbytes + encodings.RLE_SCRATCH_BYTES


def test_polygon_memory_stays_under_what_is_held() -> None:
    """Smooth classes whose boxes span the map, and 2x2 blocks (many corners): the traced peak
    (OpenCV's own buffers are not traced; benchmarks/encoding_memory.py measures RSS) is within
    ``encoding_bytes`` for the map's counted corners."""
    rng = np.random.default_rng(5)
    smooth = cv2.resize(
        rng.integers(0, 19, (24, 24), dtype=np.uint8), (1200, 1200), interpolation=cv2.INTER_NEAREST
    )
    blocks = np.repeat(np.repeat(rng.integers(0, 2, (300, 300), dtype=np.uint8), 2, 0), 2, 1)
    for labels in (smooth, blocks):
        corners = polygon_corners(labels)
        peak = traced_peak(encode_polygons_json, labels, CLASSES, 0.0, "m", corners)
        held = encoding_bytes("polygons", *labels.shape, 1, corners)
        assert peak < held, (peak / labels.size, held / labels.size)
    most = encoding_bytes("polygons", 1000, 1000, 1)  # corners unknown: the most it may have
    assert most == 24 * 1_000_000 + 600 * MAX_POLYGON_CORNERS


def test_a_class_is_traced_in_the_boxes_of_its_separate_blobs(
    photo_labels: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """150 classes, each four 2x2 blobs at the map's corners: each class is traced in its blobs'
    boxes, not in the box spanning the map (a 36 MP map of these took 46 s and +508 MB traced
    whole, 2.1 s and +327 MB now). The polygons, and their order, are those of one trace of the
    whole box: every cut forced (no cost per box) gives the same answer byte for byte."""
    side = 600
    labels = label_map("corners150", side)  # the benchmark's map (benchmarks/encoding_memory.py)
    traced = []
    trace = cv2.findContours

    def recording(image: np.ndarray, *args: object, **kwargs: object) -> object:
        traced.append(image.size)
        return trace(image, *args, **kwargs)

    monkeypatch.setattr(cv2, "findContours", recording)
    whole = encode_polygons_json(labels, CLASSES, 0.0, "m")
    assert len(traced) == 1 + 149 * 4  # the background's one box, four boxes a class
    assert sum(traced) == (2 * side + 4) ** 2 + 149 * 4 * 8**2  # 2x2 blobs: 8x8 framed
    assert len(json.loads(whole)["features"][5]["geometry"]["coordinates"]) == 4
    maps = [labels, photo_labels, *random_maps(40)]
    sparse = np.random.default_rng(9).random((60, 70)) < 0.85
    maps.append(np.where(sparse, 0, np.repeat(np.arange(7), 10)[None, :]).astype(np.uint8))
    for labels in maps:
        for tolerance in (0.0, 1.0):
            monkeypatch.setattr(encodings, "BOX_COST_PIXELS", 1 << 40)  # one box a class
            one_box = encode_polygons_json(labels, CLASSES, tolerance, "m")
            monkeypatch.setattr(encodings, "BOX_COST_PIXELS", 0)  # every cut taken
            assert encode_polygons_json(labels, CLASSES, tolerance, "m") == one_box


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


def test_polygons_are_valid_for_geos(photo_labels: np.ndarray) -> None:
    """Pixels that touch only diagonally pinched their component's ring (or a hole's) at the
    shared corner, which GEOS (shapely, PostGIS, QGIS) calls a self-intersection: 3 of 8 classes
    of a photo-like map were invalid. Each lobe is now its own polygon (or hole); GEOS finds
    every feature valid and of the class's pixel count in area."""
    pinched = np.zeros((7, 7), np.uint8)
    pinched[1:6, 1:6] = 1
    pinched[2, 2] = pinched[3, 3] = pinched[4, 4] = 0  # holes meeting at corners
    pinched[0, 0] = 1  # a lobe hanging off a corner
    diagonal_ring = np.zeros((5, 5), np.uint8)
    diagonal_ring[1, 2] = diagonal_ring[2, 1] = diagonal_ring[2, 3] = diagonal_ring[3, 2] = 1
    checkerboard = (np.indices((9, 11)).sum(axis=0) % 3 == 0).astype(np.uint8)
    maps = [np.eye(2, dtype=np.uint8), pinched, diagonal_ring, checkerboard, photo_labels]
    for labels in [*maps, *random_maps(80)]:
        for feature in polygons_geojson(labels, CLASSES)["features"]:
            geometry = shape(feature["geometry"])
            assert geometry.is_valid, (labels.tolist(), explain_validity(geometry))
            assert geometry.area == (labels == feature["id"]).sum()
            np.testing.assert_array_equal(
                rasterise(feature["geometry"]["coordinates"], labels.shape),
                labels == feature["id"],
            )
    two_squares = polygons_geojson(np.eye(2, dtype=np.uint8), CLASSES)["features"][1]
    assert len(two_squares["geometry"]["coordinates"]) == 2


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
