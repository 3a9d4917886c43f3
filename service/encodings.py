"""Label maps in the formats other tools read: COCO RLE per class, GeoJSON polygons per class, and
class probabilities as a float16 ``.npy``.

Pure NumPy/OpenCV functions returning the response bytes, so routes stay thin and every encoding
is tested against its real decoder (``pycocotools``, a polygon rasteriser, ``numpy.load``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from service.errors import PayloadTooLargeError

# Largest Douglas-Peucker tolerance a request may ask for, in pixels.
MAX_POLYGON_TOLERANCE = 100.0
# Most corner points (pixel corners where class boundaries turn) a polygon answer may have: each
# is a vertex of two or three class polygons, so this bounds the answer near 1.5 million vertices,
# about 20 MB of GeoJSON and 150 MB of Python lists while it is written. A label map more
# fragmented than that (the noise of an untrained model, say) is refused, counted before tracing,
# with a pointer to RLE, whose size follows the runs instead.
MAX_POLYGON_CORNERS = 500_000


def _class_runs(labels: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per class present: start and end offsets of its runs in column-major (COCO) order."""
    flat = np.ascontiguousarray(labels.T).ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [flat.size]))
    values = flat[starts]
    order = np.argsort(values, kind="stable")  # runs grouped by class, in image order
    grouped = values[order]
    classes, first = np.unique(grouped, return_index=True)
    bounds = np.append(first, len(order))
    return {
        int(c): (starts[order[a:b]], ends[order[a:b]])
        for c, a, b in zip(classes.tolist(), bounds[:-1], bounds[1:], strict=True)
    }


def _rle_counts(starts: np.ndarray, ends: np.ndarray, total: int) -> np.ndarray:
    """COCO's alternating run lengths (zeros first, possibly 0) of one class's runs."""
    gaps = starts - np.concatenate(([0], ends[:-1]))
    counts = np.stack((gaps, ends - starts), axis=1).ravel()
    trailing = total - int(ends[-1])
    return np.append(counts, trailing) if trailing else counts


def rle_string(counts: np.ndarray) -> str:
    """pycocotools' compressed ``counts`` string (``rleToString``), vectorised: each count after
    the third is stored as its difference to the count two before, in 5-bit groups, low group
    first, 0x20 marking "more follows", offset by 48 into printable ASCII."""
    values = counts.astype(np.int64)
    values[3:] -= counts[1:-2]
    largest = int(np.abs(values).max(initial=0))
    groups = largest.bit_length() // 5 + 1  # 5-bit groups for the magnitude and the sign
    shifted = values[:, None] >> (5 * np.arange(groups, dtype=np.int64))[None, :]
    chunks = shifted & 0x1F
    rest = shifted >> 5
    done = np.where(chunks & 0x10, rest == -1, rest == 0)
    lengths = np.argmax(done, axis=1) + 1
    used = np.arange(groups)[None, :] < lengths[:, None]
    more = np.arange(groups)[None, :] < (lengths - 1)[:, None]
    chars = (chunks | (more * 0x20)) + 48
    return chars[used].astype(np.uint8).tobytes().decode("ascii")


def coco_rle(labels: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    """One COCO annotation per class present: ``category_id``, ``name``, ``area`` (pixels) and
    ``segmentation`` as compressed RLE (``size`` [height, width], ``counts``), which
    ``pycocotools.mask.decode`` turns back into that class's pixels."""
    height, width = labels.shape
    annotations = []
    for class_id, (starts, ends) in _class_runs(labels).items():
        counts = _rle_counts(starts, ends, labels.size)
        annotations.append(
            {
                "category_id": class_id,
                "name": classes[class_id],
                "area": int((ends - starts).sum()),
                "segmentation": {"size": [height, width], "counts": rle_string(counts)},
            }
        )
    return annotations


def encode_rle_json(labels: np.ndarray, classes: Sequence[str], model: str) -> bytes:
    body = {
        "model": model,
        "width": int(labels.shape[1]),
        "height": int(labels.shape[0]),
        "annotations": coco_rle(labels, classes),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _edge_rings(contours: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Traced contours as rings on pixel edges, all at once: ``findContours`` ran on the mask
    upsampled 2x, whose boundary pixels ``j`` lie on the original pixel edge ``(j + 1) // 2``.
    Vertices equal to their successor are dropped, then those where the direction does not turn,
    leaving only corners."""
    sizes = np.fromiter((len(c) for c in contours), np.int64, len(contours))
    points = (np.concatenate(contours).reshape(-1, 2) + 1) >> 1
    ring_of = np.repeat(np.arange(len(contours)), sizes)
    step = _next_in_ring(points, sizes) - points
    moving = step.any(axis=1)
    points, step, ring_of = points[moving], step[moving], ring_of[moving]
    sizes = np.bincount(ring_of, minlength=len(contours))
    before = _previous_in_ring(step, sizes)
    corner = before[:, 0] * step[:, 1] - before[:, 1] * step[:, 0] != 0
    sizes = np.bincount(ring_of[corner], minlength=len(contours))
    return np.split(points[corner], np.cumsum(sizes)[:-1])


def _next_in_ring(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    following = np.roll(values, -1, axis=0)
    ends = np.cumsum(sizes)
    nonempty = sizes > 0
    following[ends[nonempty] - 1] = values[(ends - sizes)[nonempty]]
    return following


def _previous_in_ring(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    preceding = np.roll(values, 1, axis=0)
    ends = np.cumsum(sizes)
    nonempty = sizes > 0
    preceding[(ends - sizes)[nonempty]] = values[ends[nonempty] - 1]
    return preceding


def _geojson_ring(ring: np.ndarray, exterior: bool, tolerance: float) -> list[list[int]] | None:
    """A closed GeoJSON ring (first vertex repeated) after Douglas-Peucker at ``tolerance``, in
    RFC 7946 winding (exteriors positive signed area in the x, y numbers, holes negative); None
    when fewer than three vertices remain."""
    if tolerance > 0 and len(ring) >= 3:
        ring = cv2.approxPolyDP(ring.reshape(-1, 1, 2).astype(np.int32), tolerance, True)
        ring = ring.reshape(-1, 2)
    if len(ring) < 3:
        return None
    here = ring.astype(np.int64)
    following = np.concatenate((here[1:], here[:1]))
    twice_area = int(np.sum(here[:, 0] * following[:, 1] - following[:, 0] * here[:, 1]))
    if (twice_area > 0) != exterior:
        ring = ring[::-1]
    coordinates: list[list[int]] = ring.tolist()
    return [*coordinates, coordinates[0]]


def polygon_corners(labels: np.ndarray) -> int:
    """Pixel corners where a class boundary turns: those whose four pixels are neither one class
    nor split straight in two, counting the image border as a class of its own."""
    a, b, c, d = labels[:-1, :-1], labels[:-1, 1:], labels[1:, :-1], labels[1:, 1:]
    inside = int(np.count_nonzero(~(((a == b) & (c == d)) | ((a == c) & (b == d)))))
    border = sum(
        int(np.count_nonzero(line[1:] != line[:-1]))
        for line in (labels[0], labels[-1], labels[:, 0], labels[:, -1])
    )
    return inside + border + 4


def class_polygons(mask: np.ndarray, tolerance: float = 0.0) -> list[list[list[list[int]]]]:
    """MultiPolygon coordinates of a boolean mask in pixel-edge coordinates (pixel (row r, col c)
    is the square [c, c+1] x [r, r+1]): one polygon per 8-connected component, with its holes.
    At ``tolerance`` 0 the polygons cover exactly the mask's pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return []
    top, left = int(rows[0]), int(cols[0])
    crop = mask[top : rows[-1] + 1, left : cols[-1] + 1].astype(np.uint8)
    doubled = cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    padded = cv2.copyMakeBorder(doubled, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, hierarchy = cv2.findContours(
        padded, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE, offset=(2 * left - 1, 2 * top - 1)
    )
    if hierarchy is None:
        return []
    rings = _edge_rings(contours)
    # Per contour: next sibling, previous sibling, first child (hole), parent.
    links: list[list[int]] = hierarchy.reshape(-1, 4).astype(int).tolist()
    polygons = []
    for index, (_, _, child, parent) in enumerate(links):
        if parent != -1:
            continue  # a hole: written with its outer boundary
        exterior = _geojson_ring(rings[index], True, tolerance)
        if exterior is None:
            continue
        polygon = [exterior]
        while child != -1:
            hole = _geojson_ring(rings[child], False, tolerance)
            if hole is not None:
                polygon.append(hole)
            child = links[child][0]
        polygons.append(polygon)
    return polygons


def polygons_geojson(
    labels: np.ndarray, classes: Sequence[str], tolerance: float = 0.0
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection with one MultiPolygon feature per class present, in image
    pixel coordinates ([x, y], y down, pixel edges on integers)."""
    corners = polygon_corners(labels)
    if corners > MAX_POLYGON_CORNERS:
        raise PayloadTooLargeError(
            f"the label map is too fragmented for polygons ({corners} corners, the limit is "
            f"{MAX_POLYGON_CORNERS}): ask for output=rle instead"
        )
    counts = np.bincount(labels.ravel())
    ids = np.flatnonzero(counts)
    features = []
    for class_id, pixels in zip(ids.tolist(), counts[ids].tolist(), strict=True):
        features.append(
            {
                "type": "Feature",
                "id": class_id,
                "properties": {"class_id": class_id, "name": classes[class_id], "pixels": pixels},
                "geometry": {
                    "type": "MultiPolygon",
                    "coordinates": class_polygons(labels == class_id, tolerance),
                },
            }
        )
    return {
        "type": "FeatureCollection",
        "width": int(labels.shape[1]),
        "height": int(labels.shape[0]),
        "features": features,
    }


def encode_polygons_json(
    labels: np.ndarray, classes: Sequence[str], tolerance: float, model: str
) -> bytes:
    body = {"model": model, **polygons_geojson(labels, classes, tolerance)}
    return json.dumps(body, separators=(",", ":")).encode()


def encode_probabilities_npy(probabilities: np.ndarray) -> memoryview:
    """(C, H, W) probabilities as a float16 ``.npy`` file (``numpy.load`` reads it), converted
    straight into the answer's buffer: half the float32 planes on top of them, so encoding stays
    under the engine's own peak, which the request budget (``planning.peak_bytes``) bounds."""
    header = io.BytesIO()
    shape = tuple(int(n) for n in probabilities.shape)
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f2", "fortran_order": False, "shape": shape}
    )
    offset = header.tell()
    answer = bytearray(offset + 2 * probabilities.size)
    answer[:offset] = header.getvalue()
    values = np.frombuffer(answer, "<f2", offset=offset).reshape(shape)
    np.copyto(values, probabilities, casting="same_kind")
    return memoryview(answer)
