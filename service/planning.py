"""Planning a request: options and an image size in, passes and windows out (pure, no I/O).

This is the one place where a request's options are checked against ``Limits``; the route plans
once, and the engine runs that plan. A pass is one forward of the image at one TTA ratio and flip;
whole mode is one window covering the resized image, slide mode mmseg's window grid. The memory a
plan will take, and then its answer, is estimated here (``request_bytes``) and refused over
``Limits.max_request_bytes`` before anything is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.bundle import BundleMetadata
from service.config import Limits
from service.encodings import encoding_bytes
from service.errors import InvalidParameterError, PayloadTooLargeError
from service.geometry import (
    Window,
    grid_count,
    labels_dtype,
    ratio_size,
    rescale_size,
    window_grid,
)


@dataclass(frozen=True)
class SegmentOptions:
    mode: Literal["whole", "slide"] | None = None  # None -> bundle test_config.mode
    scales: tuple[float, ...] | None = None  # TTA ratios; None -> single pass at the test scale
    flip: bool = False
    crop: tuple[int, int] | None = None  # (h, w); None -> bundle default
    stride: tuple[int, int] | None = None
    return_probabilities: bool = False
    encoding: Literal["rle", "polygons"] | None = None  # the label map's answer, when encoded


@dataclass(frozen=True)
class PassPlan:
    """One forward pass of the image: its resized size, flip and windows on the resized image."""

    height: int
    width: int
    flip: bool
    windows: tuple[Window, ...]


@dataclass(frozen=True)
class Plan:
    """What the engine runs for one request, on an image of ``height`` x ``width``."""

    mode: Literal["whole", "slide"]
    passes: tuple[PassPlan, ...]
    height: int
    width: int
    probabilities: bool = False
    encoding: Literal["rle", "polygons"] | None = None

    @property
    def num_inputs(self) -> int:
        return sum(len(p.windows) for p in self.passes)


def _pair(value: object, what: str) -> tuple[int, int]:
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise InvalidParameterError(f"{what} must be two integers (height, width), got {value!r}")
    return value[0], value[1]


def _slide_window(
    metadata: BundleMetadata, options: SegmentOptions, limits: Limits
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Crop and stride of a slide request: the asked ones, else the bundle's window. An asked
    crop without a stride gets the bundle's stride capped at the crop, or two thirds of the crop
    (mmseg's usual overlap) when the bundle has none."""
    test_config = metadata.test_config
    if options.crop is None and test_config.crop is None:
        raise InvalidParameterError(
            "slide mode needs a window and this bundle has no default one (no known dataset): "
            "pass crop=HxW or crop=N (e.g. crop=512), and optionally stride"
        )
    crop = _pair(options.crop or test_config.crop, "crop")
    if min(crop) < 1 or max(crop) > limits.max_crop:
        raise InvalidParameterError(f"crop sides must be in 1..{limits.max_crop}, got {crop}")
    if options.stride is not None:
        stride = _pair(options.stride, "stride")
    elif test_config.stride is not None:
        stride = (min(test_config.stride[0], crop[0]), min(test_config.stride[1], crop[1]))
    else:
        stride = (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
    if min(stride) < 1:
        raise InvalidParameterError(f"stride must be positive, got {stride}")
    return crop, stride


def _check_coverage(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> None:
    """Refuse a window grid that leaves pixels of an (already resized) pass uncovered, which is
    where mmseg's ``slide_inference`` fails its ``count_mat`` assertion. A stride over the crop
    is fine as long as no gap opens: along an axis the first window is ``[0, crop)`` and the last
    is clamped to end at the edge, so the windows meet when the side is at most twice the crop;
    a longer side puts a second window at ``stride``, past the first one's end."""
    for axis, size, side, step in (
        ("height", height, crop[0], stride[0]),
        ("width", width, crop[1], stride[1]),
    ):
        if step > side and size > 2 * side:
            gap_end = min(step, size - side)  # the second window's start, or the last one's
            raise InvalidParameterError(
                f"stride {stride} over the crop {crop} leaves pixels {side}..{gap_end} "
                f"uncovered along the {axis} of a {width}x{height} pass: use a stride of at "
                "most the crop"
            )


def plan_request(
    metadata: BundleMetadata, options: SegmentOptions, height: int, width: int, limits: Limits
) -> Plan:
    """Turn options and an image size into passes and windows; refuse bad options by name, a
    request needing more than ``max_inputs_per_request`` model inputs before any window is
    listed (tiny strides on a big image would otherwise take the memory of millions of windows),
    and one whose estimated memory is over ``max_request_bytes``."""
    test_config = metadata.test_config
    if height < 1 or width < 1:
        raise InvalidParameterError(f"image size {width}x{height} is empty")
    if height * width > limits.max_pixels:
        raise PayloadTooLargeError(
            f"image has {height * width} pixels, the limit is {limits.max_pixels}"
        )
    mode = options.mode or test_config.mode
    if mode not in ("whole", "slide"):
        raise InvalidParameterError(f"mode must be 'whole' or 'slide', got {mode!r}")
    crop = stride = None
    if mode == "slide":
        crop, stride = _slide_window(metadata, options, limits)
    elif options.crop is not None or options.stride is not None:
        raise InvalidParameterError("crop and stride apply to slide mode only")

    if options.scales is None:
        if test_config.resize_scale is None:
            sizes = [(width, height)]
        elif test_config.keep_ratio:
            sizes = [rescale_size(width, height, test_config.resize_scale)]
        else:
            sizes = [test_config.resize_scale]
    else:
        if not options.scales or len(options.scales) > limits.max_scales:
            raise InvalidParameterError(
                f"{len(options.scales)} scales requested; between 1 and {limits.max_scales} "
                "are allowed"
            )
        for ratio in options.scales:
            if not (isinstance(ratio, int | float) and math.isfinite(ratio)):
                raise InvalidParameterError(f"scale ratio {ratio!r} is not a number")
            if not 0 < ratio <= limits.max_scale_ratio:
                raise InvalidParameterError(
                    f"scale ratios must be in (0, {limits.max_scale_ratio}], got {ratio}"
                )
        sizes = [ratio_size(width, height, ratio) for ratio in options.scales]

    flips = 2 if options.flip else 1
    if len(sizes) * flips > limits.max_tta_inputs:
        raise InvalidParameterError(
            f"{len(sizes) * flips} test-time passes (scales x flips), the limit is "
            f"{limits.max_tta_inputs}"
        )
    inputs = 0
    for scaled_w, scaled_h in sizes:
        if scaled_w < 1 or scaled_h < 1:
            if options.scales is None:
                raise InvalidParameterError(
                    f"the model's test resize to {test_config.resize_scale} (keeping the aspect "
                    f"ratio, as mmseg does) makes the {width}x{height} image {scaled_w}x"
                    f"{scaled_h}: ask for scales=1 to run it at its own size"
                )
            raise InvalidParameterError(
                f"a scale makes the {width}x{height} image {scaled_w}x{scaled_h}, empty"
            )
        if scaled_w * scaled_h > limits.max_pixels:
            raise InvalidParameterError(
                f"a scale makes the image {scaled_w}x{scaled_h}, over {limits.max_pixels} pixels"
            )
        input_h, input_w = (
            (scaled_h, scaled_w)
            if crop is None
            else (
                min(crop[0], scaled_h),
                min(crop[1], scaled_w),
            )
        )
        if input_h * input_w > limits.max_input_pixels:
            raise InvalidParameterError(
                f"{mode} mode would run the model on a {input_w}x{input_h} input, over the "
                f"{limits.max_input_pixels} pixels one input may have (SEGSERVE_MAX_INPUT_PIXELS): "
                + (
                    "use mode=slide with a crop, or smaller scales"
                    if crop is None
                    else "use a smaller crop"
                )
            )
        if crop is not None and stride is not None:
            _check_coverage(scaled_h, scaled_w, crop, stride)
            rows = grid_count(scaled_h, crop[0], stride[0])
            inputs += rows * grid_count(scaled_w, crop[1], stride[1]) * flips
        else:
            inputs += flips
    if inputs > limits.max_inputs_per_request:
        raise InvalidParameterError(
            f"this request needs {inputs} model inputs (windows x scales x flips), the limit is "
            f"{limits.max_inputs_per_request}: use a larger stride or crop, or fewer scales"
        )

    passes = []
    for scaled_w, scaled_h in sizes:
        if mode == "slide":
            assert crop is not None and stride is not None
            windows = tuple(window_grid(scaled_h, scaled_w, crop, stride))
        else:
            windows = (Window(0, scaled_h, 0, scaled_w),)
        for flip in (False, True) if options.flip else (False,):
            passes.append(PassPlan(scaled_h, scaled_w, flip, windows))
    plan = Plan(mode, tuple(passes), height, width, options.return_probabilities, options.encoding)
    needed = request_bytes(plan, metadata.num_classes, metadata.output.stride)
    if needed > limits.max_request_bytes:
        raise PayloadTooLargeError(
            f"this request would take about {needed / MIB:.0f} MiB of memory, over the "
            f"per-request budget of {limits.max_request_bytes / MIB:.0f} MiB "
            "(SEGSERVE_MAX_REQUEST_BYTES): send a smaller image, or fewer scales / no flip"
        )
    return plan


MIB = 1 << 20
_FLOAT = 4  # bytes per logit / probability (float32)


def _pass_logits_bytes(
    pass_plan: PassPlan, num_classes: int, output_stride: int, may_keep: bool
) -> int:
    """One pass's logits as ``PassMerge`` holds them: a single window's raw output, else the
    summed planes at the resized size plus the window counts (merged), or for a pass merged tile
    by tile (a labels-only single pass, any of several passes) the smaller of that and the
    windows' outputs (``keep_windows``)."""
    windows = pass_plan.windows
    if len(windows) == 1:
        window = windows[0]
        cells = -(-window.height // output_stride) * -(-window.width // output_stride)
        return num_classes * cells * _FLOAT
    merged = (num_classes + 1) * pass_plan.height * pass_plan.width
    kept = sum(w.height * w.width for w in windows) // output_stride**2 * num_classes
    return (min(kept, merged) if may_keep else merged) * _FLOAT


def request_bytes(plan: Plan, num_classes: int, output_stride: int) -> int:
    """What one request is held to and refused over: running its plan, then its answer."""
    return peak_bytes(plan, num_classes, output_stride) + answer_bytes(plan, num_classes)


def answer_bytes(plan: Plan, num_classes: int) -> int:
    """Memory the answer takes beside ``peak_bytes``: probabilities are sent as float16 (C, H, W)
    (``.npy`` or the inference protocol's binary tensor), and a body that big is copied once more
    into the socket's buffer while it goes out. A 620x620 probabilities request took 590 MB
    against its plan's 220 MiB before this was held too. RLE and polygons take their encoder's
    measured working memory (``encodings.encoding_bytes``: an RLE of a noisy 36 MP map peaked
    1.26 GB over its labels before the encoder was made lean; polygons count the most corners
    the map may have). The PNG outputs are left out."""
    if plan.probabilities:
        return 2 * 2 * num_classes * plan.height * plan.width
    if plan.encoding is not None:
        label_bytes = np.dtype(labels_dtype(num_classes)).itemsize
        return encoding_bytes(plan.encoding, plan.height, plan.width, label_bytes)
    return 0


def peak_bytes(plan: Plan, num_classes: int, output_stride: int) -> int:
    """Estimated peak memory of running ``plan``: the decoded image and its label map, the
    largest resized image, and the class scores the engine's merge path holds at once.

    One labels-only pass needs only its logits (``labelmap`` works tile by tile); a flipped or
    probabilities pass also takes (C, H, W) float32 planes at the original size. Several passes
    (``ttamap``, tile by tile too) hold every pass's logits, kept as windows where that is smaller,
    and the (C, H, W) probabilities only when they are asked for. Kept in step with
    ``Engine._labels``; the small per-window inputs in flight and the kernels' per-tile scratch
    are left out.
    """
    original = plan.height * plan.width
    fixed = original * 3 + original * np.dtype(labels_dtype(num_classes)).itemsize
    fixed += max(p.height * p.width * 3 for p in plan.passes)
    planes = num_classes * original * _FLOAT
    if len(plan.passes) == 1:
        only = plan.passes[0]
        labels_only = not (plan.probabilities or only.flip)
        logits = _pass_logits_bytes(only, num_classes, output_stride, may_keep=labels_only)
        return fixed + logits + (0 if labels_only else planes)
    logits = sum(
        _pass_logits_bytes(p, num_classes, output_stride, may_keep=True) for p in plan.passes
    )
    return fixed + logits + (planes if plan.probabilities else 0)
