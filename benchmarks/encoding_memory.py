"""Peak memory of the label-map encoders per pixel, the figures behind
``service.encodings.RLE_BYTES_PER_PIXEL`` and ``POLYGON_BYTES_PER_PIXEL`` / ``_PER_CORNER``.

Each case runs in its own process: the label map is made, then one encoding, and the process's
peak RSS growth (``ru_maxrss``: OpenCV's own buffers included) and, in a second run, the
tracemalloc peak (NumPy arrays and Python objects only) are printed in bytes a pixel::

    .venv/bin/python benchmarks/encoding_memory.py            # 2000x2000 maps
    .venv/bin/python benchmarks/encoding_memory.py --side 6000 --cases poly:corners150
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.encodings import (
    encode_polygons_json,
    encode_rle_json,
    encoding_bytes,
    polygon_corners,
)

CASES = (
    "rle:smooth19",
    "rle:noise2",
    "rle:noise8",
    "rle:noise150",
    "rle:noise300",
    "rle:noise2000",
    "poly:smooth19",
    "poly:corners150",
    "poly:blocks4",
    "poly:blocks12",
)


def label_map(kind: str, side: int) -> np.ndarray:
    """noiseK: uniform noise of K classes (16-bit over 256); smooth19: 19 classes in 64-pixel
    cells; blocksN: two classes in NxN cells (many corners); corners150: 149 classes of four 2x2
    blobs at the map's corners (each class's box spans the map)."""
    rng = np.random.default_rng(0)
    if kind.startswith("noise"):
        classes = int(kind[5:])
        dtype = np.uint8 if classes <= 256 else np.uint16
        return rng.integers(0, classes, (side, side), dtype=dtype)
    if kind == "smooth19":
        cells = rng.integers(0, 19, (side // 64 + 1, side // 64 + 1), dtype=np.uint8)
        return cv2.resize(cells, (side, side), interpolation=cv2.INTER_NEAREST)
    if kind.startswith("blocks"):
        cell = int(kind[6:])
        cells = rng.integers(0, 2, (side // cell + 1, side // cell + 1), dtype=np.uint8)
        return np.repeat(np.repeat(cells, cell, 0), cell, 1)[:side, :side].copy()
    if kind == "corners150":
        labels = np.zeros((side, side), np.uint8)
        for class_id in range(1, 150):
            row, col = divmod(class_id, 12)
            for y in (3 * row, side - 3 - 3 * row):
                for x in (3 * col, side - 3 - 3 * col):
                    labels[y : y + 2, x : x + 2] = class_id
        return labels
    raise ValueError(kind)


def measure(case: str, side: int, traced: bool) -> dict[str, object]:
    encoding, kind = case.split(":")
    labels = label_map(kind, side)
    classes = [f"class{i}" for i in range(65536)]
    corners = polygon_corners(labels) if encoding == "poly" else -1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    try:
        if encoding == "rle":
            answer: object = len(encode_rle_json(labels, classes, "m"))
        else:
            answer = len(encode_polygons_json(labels, classes, 0.0, "m", corners))
    except Exception as exc:  # a refusal (too many corners) is a result too
        answer = type(exc).__name__
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] if traced else 0
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    held = encoding_bytes(
        "rle" if encoding == "rle" else "polygons", side, side, labels.itemsize, corners
    )
    pixels = labels.size
    result = {
        "case": case,
        "pixels": pixels,
        "seconds": round(seconds, 2),
        "answer": answer,
        "held_per_pixel": round(held / pixels, 1),
    }
    if encoding == "poly":
        result["corners"] = corners
    result["traced_per_pixel" if traced else "rss_per_pixel"] = round(
        (peak if traced else grown) / pixels, 2
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=2000)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.side, args.traced)))
        return
    for case in args.cases:
        row: dict[str, object] = {}
        for traced in (True, False):  # the untraced run's seconds are kept
            command = [sys.executable, __file__, "--one", case, "--side", str(args.side)]
            output = subprocess.run(
                command + (["--traced"] if traced else []),
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            row.update(json.loads(output))
        print(json.dumps(row))


if __name__ == "__main__":
    main()
