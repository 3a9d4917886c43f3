"""Merging a pass's window outputs into logits, and a single pass into probabilities (NumPy).

Per pass, exactly as mmseg: the window logits are resized bilinearly (align_corners False) to the
window size (``decode_head.predict``), summed and divided by the per-pixel window count
(``slide_inference``), flipped back, resized to the original size (``postprocess_result``).
Several passes are merged tile by tile by ``ttamap``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from service.geometry import (
    Window,
    argmax_planes,
    labels_dtype,
    planes_to_original,
    resize_plane,
    softmax,
    window_counts,
)
from service.planning import PassPlan
from service.ttamap import PassLogits


def keep_windows(pass_plan: PassPlan, output_stride: int) -> bool:
    """Whether a pass merged tile by tile (``labelmap``, ``ttamap``) keeps its window logits: when
    they take no more memory than the merged buffer would (windows at most ``stride`` apart; always
    for a single window, which is kept as it is)."""
    window_pixels = sum(w.height * w.width for w in pass_plan.windows)
    return window_pixels <= pass_plan.height * pass_plan.width * output_stride**2


class PassMerge:
    """One pass's logits as its windows' outputs arrive.

    A single window (whole mode, or an image within one crop) keeps the raw model output: its
    resize to the image happens in the final step. Several windows are either kept as they are
    (``keep_windows``), for ``labelmap`` / ``ttamap`` to merge only where and for the classes they
    need, or resized to their windows and summed at the resized image size, then divided by the
    per-pixel count.
    """

    def __init__(self, plan: PassPlan, keep_windows: bool) -> None:
        self.plan = plan
        self.keep_windows = keep_windows
        self._lock = threading.Lock()
        self._sum: np.ndarray | None = None
        self._windows: np.ndarray | None = None  # (windows, C, h, w), filled as they arrive

    def window_logits(self) -> np.ndarray:
        """The kept logits, (windows, C, h, w) in window order (every window has arrived)."""
        assert self._windows is not None
        return self._windows

    def add(self, index: int, logits: np.ndarray) -> None:
        """Merge the (C, h, w) logits of window ``index`` (thread-safe)."""
        if self.keep_windows:
            if len(self.plan.windows) == 1:
                self._windows = logits[None]
                return
            with self._lock:
                if self._windows is None:
                    shape = (len(self.plan.windows), *logits.shape)
                    self._windows = np.empty(shape, np.float32)
            self._windows[index] = logits
            return
        if len(self.plan.windows) == 1:
            self._sum = logits
            return
        window = self.plan.windows[index]
        with self._lock:
            if self._sum is None:
                shape = (logits.shape[0], self.plan.height, self.plan.width)
                self._sum = np.zeros(shape, np.float32)
            region = self._sum[:, window.y1 : window.y2, window.x1 : window.x2]
            for channel, plane in enumerate(logits):
                region[channel] += resize_plane(plane, window.height, window.width)

    def pass_logits(self) -> PassLogits:
        """This pass as the tile-wise kernels (``labelmap``, ``ttamap``) read it: its kept
        windows, or its merged logits as one window covering the resized image."""
        scaled = (self.plan.height, self.plan.width)
        if self.keep_windows:
            return PassLogits(self.plan.windows, self.window_logits(), scaled, self.plan.flip)
        whole = (Window(0, scaled[0], 0, scaled[1]),)
        return PassLogits(whole, self.logits()[None], scaled, self.plan.flip)

    def logits(self) -> np.ndarray:
        """(C, h, w) for a single window, else the count-normalised sum at the resized size."""
        assert self._sum is not None, "no window merged"
        if len(self.plan.windows) > 1:
            self._sum /= window_counts(self.plan.height, self.plan.width, list(self.plan.windows))
        return self._sum


def _stack(planes: Iterator[np.ndarray], channels: int, size: tuple[int, int]) -> np.ndarray:
    stacked = np.empty((channels, *size), np.float32)
    for channel, plane in enumerate(planes):
        stacked[channel] = plane
    return stacked


def single_pass_probabilities(
    logits: np.ndarray, pass_plan: PassPlan, original: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and (C, H, W) softmax at the original size of one pass's merged logits."""
    scaled = (pass_plan.height, pass_plan.width)
    planes = planes_to_original(logits, scaled, pass_plan.flip, original)
    scores = _stack(planes, logits.shape[0], original)
    return argmax_planes(scores, labels_dtype(logits.shape[0])), softmax(scores)
