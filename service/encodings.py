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
# Columns of the label map the RLE encoder takes at once, in pixels: its scratch is up to ~200
# bytes a pixel of the band (noise, every pixel a run), so about 13 MB whatever the image.
RLE_BAND_PIXELS = 1 << 16

# Working memory of the label-map encoders beside the label map (the answer included), which
# GET /masks/{id}/rle.json and polygons.geojson hold from the in-flight budget and
# planning.answer_bytes counts for POST /segment?output=rle|polygons (``encoding_bytes``).
# Peak RSS growth (tracemalloc peak) measured one process per case on 2000x2000 maps
# (benchmarks/encoding_memory.py, 2-vCPU VM, 2026-12-06), in bytes a pixel:
#   RLE: smooth 19 classes 0.2; uniform noise of 2 / 8 / 150 classes 3.2 / 6.3 / 8.8 (8-bit
#   labels; 2.9 / 5.2 / 6.8 traced), of 300 / 2000 classes 9.5 / 11.3 (16-bit labels), of 65536
#   classes 18.8; plus a band's scratch (300x300 noise maps, in two bands: 13-16 MB). The
#   encoder before the banded one peaked at 45 / 61 / 54 on noise of 8 / 2 / 300 classes, about
#   35 on a 36 MP map (+1262 MB for a 63 MB answer).
#   Polygons, the encoder counting corners itself: 8.3 for smooth 19 classes, 10.3 for 149
#   classes of four blobs at the map's corners (the corner count's masks, a class mask, a box's
#   2x upsampling and OpenCV's copy of it), plus about 450 bytes a corner (OpenCV's contours,
#   the rings, the GeoJSON lists and text): 2x2 blocks of two classes, 157 000 corners, 29.6.
RLE_BYTES_PER_PIXEL = 12  # per byte of label: 24 for 16-bit label maps
RLE_SCRATCH_BYTES = 16 << 20
POLYGON_BYTES_PER_PIXEL = 24
POLYGON_BYTES_PER_CORNER = 600


def encoding_bytes(
    output: str, height: int, width: int, label_bytes: int, corners: int = -1
) -> int:
    """Memory ``output`` ("rle" or "polygons"; 0 for any other) takes to encode a label map of
    ``height`` x ``width`` with ``label_bytes`` bytes a label, by the measured figures above.
    Polygons count ``corners`` when known (``polygon_corners``), else the most the map could
    have up to ``MAX_POLYGON_CORNERS``, past which it is refused before tracing."""
    pixels = height * width
    if output == "rle":
        return RLE_BYTES_PER_PIXEL * label_bytes * pixels + RLE_SCRATCH_BYTES
    if output == "polygons":
        most = min((height + 1) * (width + 1), MAX_POLYGON_CORNERS)
        counted = most if corners < 0 else min(corners, most)
        return POLYGON_BYTES_PER_PIXEL * pixels + POLYGON_BYTES_PER_CORNER * counted
    return 0


def _rle_chars(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rleToString``'s characters for ``values`` (counts already differenced): each in 5-bit
    groups, low group first, 0x20 marking "more follows", offset by 48 into printable ASCII.
    Returns the characters and how many each value took."""
    lengths = np.ones(len(values), np.int64)
    for group in range(1, 13):  # a value fits in 5 * g bits (two's complement)
        half = 1 << (5 * group - 1)
        wider = (values >= half) | (values < -half)
        if not wider.any():
            break
        lengths += wider
    ends = np.cumsum(lengths)
    starts = ends - lengths
    chars = np.empty(int(ends[-1]) if len(ends) else 0, np.uint8)
    for group in range(int(lengths.max(initial=0))):
        chosen = lengths > group
        part = values[chosen] >> (5 * group)
        more = (lengths[chosen] - 1 > group).astype(np.int64) << 5
        chars[starts[chosen] + group] = ((part & 0x1F) | more) + 48
    return chars, ends


class _RleWriter:
    """Per class, its compressed ``counts`` string so far, written band by band: runs are found
    in column-major (COCO) order one band of columns at a time, and each class keeps where its
    last run ended and its last two counts (each count after the third is stored as its
    difference to the count two before), so no array of the image's size is ever made."""

    def __init__(self, classes: int, total: int) -> None:
        self.total = total
        self.end = np.zeros(classes, np.int64)  # where the class's last run ended
        self.written = np.zeros(classes, np.int64)  # counts written
        self.last = np.zeros((classes, 2), np.int64)  # its last gap and run length
        self.area = np.zeros(classes, np.int64)
        self.strings: dict[int, bytearray] = {}  # its counts so far, escaped for JSON

    def runs(self, starts: np.ndarray, ends: np.ndarray, values: np.ndarray) -> None:
        """Complete runs (``starts`` ascending) of classes ``values``."""
        order = np.argsort(values, kind="stable")  # grouped by class, in image order
        starts, ends, values = starts[order], ends[order], values[order]
        classes, first, sizes = np.unique(values, return_index=True, return_counts=True)
        last = first + sizes - 1
        before = np.empty_like(ends)
        before[1:] = ends[:-1]
        before[first] = self.end[classes]
        counts = np.empty(2 * len(starts), np.int64)
        counts[0::2] = starts - before
        counts[1::2] = ends - starts
        index = np.arange(len(counts)) - np.repeat(2 * first - self.written[classes], 2 * sizes)
        two_before = np.empty_like(counts)
        two_before[2:] = counts[:-2]
        two_before[2 * first] = self.last[classes, 0]
        two_before[2 * first + 1] = self.last[classes, 1]
        values_out = np.where(index > 2, counts - two_before, counts)
        self.area[classes] += np.add.reduceat(counts[1::2], first)
        self.end[classes] = ends[last]
        self.written[classes] += 2 * sizes
        self.last[classes, 0] = counts[2 * last]
        self.last[classes, 1] = counts[2 * last + 1]
        chars, char_ends = _rle_chars(values_out)
        stops = char_ends[2 * last + 1].tolist()
        begin = 0
        for class_id, stop in zip(classes.tolist(), stops, strict=True):
            piece = chars[begin:stop].tobytes().replace(b"\\", b"\\\\")  # "\\" is a character
            self.strings.setdefault(class_id, bytearray()).extend(piece)
            begin = stop

    def finish(self) -> None:
        """The trailing zeros' count of each class whose last run ends before the image does."""
        for class_id, string in self.strings.items():
            trailing = self.total - int(self.end[class_id])
            if trailing:
                value = trailing
                if self.written[class_id] > 2:
                    value -= int(self.last[class_id, 0])
                chars, _ = _rle_chars(np.array([value], np.int64))
                string.extend(chars.tobytes().replace(b"\\", b"\\\\"))


def _rle_classes(labels: np.ndarray) -> _RleWriter:
    """Every class's compressed RLE, finding runs one band of columns at a time."""
    height, width = labels.shape
    writer = _RleWriter(int(labels.max(initial=0)) + 1, labels.size)
    if not labels.size:
        return writer
    columns = max(1, RLE_BAND_PIXELS // height)
    open_start, open_value = 0, labels[0, 0]  # the run still going at the band's end
    for left in range(0, width, columns):
        band = np.ascontiguousarray(labels[:, left : left + columns].T).ravel()
        new = np.flatnonzero(band[1:] != band[:-1]) + 1
        if left and band[0] != open_value:
            new = np.concatenate(([0], new))
        starts = np.concatenate(([open_start], new + left * height))
        values = np.concatenate(([open_value], band[new]))
        if len(starts) > 1:
            writer.runs(starts[:-1], starts[1:], values[:-1])
        open_start, open_value = int(starts[-1]), values[-1]
    writer.runs(np.array([open_start]), np.array([labels.size]), np.array([open_value]))
    writer.finish()
    return writer


def _rle_prefix(class_id: int, name: str, area: int, height: int, width: int) -> bytes:
    return (
        f'{{"category_id":{class_id},"name":{json.dumps(name)},"area":{area},'
        f'"segmentation":{{"size":[{height},{width}],"counts":"'
    ).encode()


def coco_rle(labels: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    """One COCO annotation per class present: ``category_id``, ``name``, ``area`` (pixels) and
    ``segmentation`` as compressed RLE (``size`` [height, width], ``counts``), which
    ``pycocotools.mask.decode`` turns back into that class's pixels."""
    height, width = labels.shape
    writer = _rle_classes(labels)
    return [
        {
            "category_id": class_id,
            "name": classes[class_id],
            "area": int(writer.area[class_id]),
            "segmentation": {
                "size": [height, width],
                "counts": writer.strings[class_id].decode("ascii").replace("\\\\", "\\"),
            },
        }
        for class_id in sorted(writer.strings)
    ]


def encode_rle_json(labels: np.ndarray, classes: Sequence[str], model: str) -> memoryview:
    """``{"model", "width", "height", "annotations": coco_rle(...)}`` as compact JSON, written
    straight into the answer's buffer class by class (each class's pieces freed once copied), so
    the answer is the only thing of its size held at once."""
    height, width = labels.shape
    writer = _rle_classes(labels)
    answer = bytearray(
        f'{{"model":{json.dumps(model)},"width":{width},"height":{height},"annotations":['.encode()
    )
    for index, class_id in enumerate(sorted(writer.strings)):
        if index:
            answer += b","
        area = int(writer.area[class_id])
        answer += _rle_prefix(class_id, classes[class_id], area, height, width)
        answer += writer.strings.pop(class_id)
        answer += b'"}}'
    answer += b"]}"
    return memoryview(answer)


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
    if (_twice_signed_area(ring) > 0) != exterior:
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


# What tracing one more box costs (a findContours call, its rings), in pixels of box: a class is
# traced in separate boxes only where they cover fewer pixels, this included, than its one box.
BOX_COST_PIXELS = 4096


def _occupied_runs(occupied: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], occupied.view(np.int8), [0]))))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def _separate_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Boxes (top, bottom, left, right) covering the mask's pixels, cut apart where a whole row
    or column of a box is empty (an XY cut): no 8-connected component, nor any hole, crosses an
    empty line, so each box holds whole components with their holes and islands, and a class
    of a few blobs far apart costs their boxes rather than the box spanning them all."""
    boxes = [(0, mask.shape[0], 0, mask.shape[1])]
    done = []
    while boxes:
        top, bottom, left, right = boxes.pop()
        region = mask[top:bottom, left:right]
        pieces = [
            (top + r0, top + r1, left + c0, left + c1)
            for r0, r1 in _occupied_runs(np.asarray(region.any(axis=1)))
            for c0, c1 in _occupied_runs(np.asarray(region[r0:r1].any(axis=0)))
        ]
        covered = sum((b - t) * (r - le) + BOX_COST_PIXELS for t, b, le, r in pieces)
        if len(pieces) > 1 and covered < (bottom - top) * (right - left):
            boxes.extend(pieces)
        else:
            done.extend(pieces if len(pieces) == 1 else [_bounds(pieces)])
    return done


def _bounds(pieces: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    tops, bottoms, lefts, rights = zip(*pieces, strict=True)
    return min(tops), max(bottoms), min(lefts), max(rights)


def class_polygons(mask: np.ndarray, tolerance: float = 0.0) -> list[list[list[list[int]]]]:
    """MultiPolygon coordinates of a boolean mask in pixel-edge coordinates (pixel (row r, col c)
    is the square [c, c+1] x [r, r+1]): one polygon per 4-connected component, with its holes,
    the last in raster order of their first pixels first (one findContours' order). At
    ``tolerance`` 0 the polygons cover exactly the mask's pixels. Traced box by box
    (``_separate_boxes``)."""
    found = [item for box in _separate_boxes(mask) for item in _box_polygons(mask, box, tolerance)]
    found.sort(key=lambda item: item[0], reverse=True)  # as one findContours lists components
    return [polygon for _, polygon in found]


def _box_polygons(
    mask: np.ndarray, box: tuple[int, int, int, int], tolerance: float
) -> list[tuple[tuple[int, int], list[list[list[int]]]]]:
    """The polygons of the components inside ``box``, each with its first pixel (row, column).

    Components are 4-connected, as OGC's Simple Features need (a polygon's interior is
    connected; pixels touching only at a corner are two polygons that touch there, which a
    MultiPolygon allows), so the complement is traced: findContours takes 1-pixels as
    8-connected and 0-pixels as 4-connected. Each class component is a hole of the complement,
    and the complement's pieces inside it are its holes."""
    top, bottom, left, right = box
    crop = mask[top:bottom, left:right]
    # The complement upsampled 2x (nearest) inside a 2-pixel frame of ones (findContours zeroes
    # the outer one), written in place: no separate upsampled and padded copies.
    padded = np.ones((2 * crop.shape[0] + 4, 2 * crop.shape[1] + 4), np.uint8)
    outside = ~crop
    for row in (2, 3):
        for col in (2, 3):
            padded[row:-2:2, col:-2:2] = outside
    contours, hierarchy = cv2.findContours(
        padded, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE, offset=(2 * left - 2, 2 * top - 2)
    )
    rings = _edge_rings(contours)
    # Per contour: next sibling, previous sibling, first child, parent.
    links: list[list[int]] = hierarchy.reshape(-1, 4).astype(int).tolist()
    depth = [0] * len(links)
    for index in range(len(links)):  # findContours lists a parent before its children
        parent = links[index][3]
        depth[index] = 0 if parent == -1 else depth[parent] + 1
    polygons = []
    for index, (_, _, child, _) in enumerate(links):
        if depth[index] % 2 == 0:
            continue  # the complement's outer border: a hole of the class, or the frame
        # A corner the exterior passes twice closes a loop of background (a cove whose mouth
        # is one corner wide): the largest loop is the exterior, the others holes.
        loops = _simple_loops(rings[index])
        if len(loops) > 1:
            loops.sort(key=lambda loop: abs(_twice_signed_area(loop)), reverse=True)
        exterior = _geojson_ring(loops[0], True, tolerance)
        if exterior is None:
            continue
        polygon = [exterior]
        holes = loops[1:]
        while child != -1:
            holes.extend(_simple_loops(rings[child]))
            child = links[child][0]
        for hole in holes:
            ring = _geojson_ring(hole, False, tolerance)
            if ring is not None:
                polygon.append(ring)
        # The first pixel's top-left corner is the exterior's first corner in (y, x) order.
        outer = loops[0]
        first_row = int(outer[:, 1].min())
        first = (first_row, int(outer[outer[:, 1] == first_row, 0].min()))
        polygons.append((first, polygon))
    return polygons


def _twice_signed_area(ring: np.ndarray) -> int:
    """Twice the signed area a ring of corners encloses (shoelace; positive counter-clockwise in
    the x, y numbers)."""
    here = ring.astype(np.int64)
    following = np.roll(here, -1, axis=0)
    return int(np.sum(here[:, 0] * following[:, 1] - following[:, 0] * here[:, 1]))


def _simple_loops(ring: np.ndarray) -> list[np.ndarray]:
    """A traced ring cut into simple loops at the corners it passes twice, which GEOS, PostGIS
    and QGIS call a self-intersection: an exterior pinches at the mouth of a cove one corner
    wide, a hole where two of its background pixels meet at a corner. The loops of a hole are
    holes that touch at that corner, which polygons allow; the pixels covered are the same."""
    if len(ring) < 8:  # two loops of at least four corners each, sharing one
        return [ring]
    keys = ring[:, 0].astype(np.int64) << 32 | ring[:, 1].astype(np.int64)
    if len(np.unique(keys)) == len(keys):
        return [ring]
    loops: list[np.ndarray] = []
    path: list[int] = []  # indices into ring, the loop being walked
    seen: dict[int, int] = {}  # key -> its position in path
    for index, key in enumerate(keys.tolist()):
        if key in seen:  # back at a corner passed before: the loop since then is closed
            start = seen[key]
            loops.append(ring[path[start:]])
            for dropped in keys[path[start + 1 :]].tolist():
                del seen[dropped]
            del path[start + 1 :]
        else:
            seen[key] = len(path)
            path.append(index)
    loops.append(ring[path])
    return loops


def polygons_geojson(
    labels: np.ndarray,
    classes: Sequence[str],
    tolerance: float = 0.0,
    corners: int | None = None,
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection with one MultiPolygon feature per class present, in image
    pixel coordinates ([x, y], y down, pixel edges on integers). ``corners``: the map's
    ``polygon_corners`` where the caller counted them already."""
    corners = polygon_corners(labels) if corners is None else corners
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
    labels: np.ndarray,
    classes: Sequence[str],
    tolerance: float,
    model: str,
    corners: int | None = None,
) -> bytes:
    body = {"model": model, **polygons_geojson(labels, classes, tolerance, corners)}
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
