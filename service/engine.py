"""The inference engine: one per loaded bundle, mmsegmentation 1.x test-time semantics.

A request is planned (``plan``: one pass per TTA ratio and flip, each pass a list of windows;
whole mode is one window covering the resized image), its inputs are streamed through the
model's ``Batcher`` with a bounded number in flight, and every output is merged into its pass's
buffer as it arrives, so memory follows the image size, not the number of windows.

Per pass, exactly as mmseg: the window logits are resized bilinearly (align_corners False) to the
window size (``decode_head.predict``), summed and divided by the per-pixel window count
(``slide_inference``), flipped back, resized to the original size (``postprocess_result``).
One pass: argmax of those logits (for labels only computed tile by tile by
``labelmap.pass_labels``, without full-size class planes). Several: argmax of the mean of their
softmax (``SegTTAModel``).
Scale ratios apply to the image as loaded (mmseg 1.x), not to the dataset's test scale.

Compute runs in a small thread pool and the batch thread; the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from service import labelmap, metrics
from service.batcher import Batcher, BatchStats
from service.bundle import Bundle, BundleError, TestConfig, discover_bundles, load_bundle
from service.errors import (
    InferenceTimeoutError,
    InvalidParameterError,
    OverloadedError,
    PayloadTooLargeError,
    UnknownModelError,
)
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
from service.runtime import CUDA, Runtime, RuntimeSettings, default_intra_op_threads

log = logging.getLogger(__name__)

MAX_CROP_SIDE = 4096
MAX_RATIO = 4.0
MAX_SCALES = 16
T = TypeVar("T")


@dataclass(frozen=True)
class EngineConfig:
    providers: tuple[str, ...] = ("cuda", "cpu")  # in preference order; "cuda" skipped if absent
    allow_cpu_fallback: bool = True  # False: requested GPU absent -> error at load
    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 256  # inputs waiting; beyond -> OverloadedError
    intra_op_threads: int = 0  # 0 = all cores this process may use (see runtime.py)
    max_pixels: int = 40_000_000
    max_tta_inputs: int = 64  # passes (scales x flips) per request
    max_inputs_per_request: int = 1024  # model inputs (windows x passes) per request
    inference_timeout_s: float = 60.0
    # Inputs one request may have queued, running or being merged at once (0: 2 x batch size).
    max_inputs_in_flight: int = 0
    # Under CUDA, accept a graph whose compute nodes run on the CPU (logged) instead of failing.
    allow_cpu_nodes: bool = False
    gpu_mem_limit_bytes: int = 0  # CUDA arena cap (0: onnxruntime's default, the whole GPU)


@dataclass(frozen=True)
class SegmentOptions:
    mode: Literal["whole", "slide"] | None = None  # None -> bundle test_config.mode
    scales: tuple[float, ...] | None = None  # TTA ratios; None -> single pass at the test scale
    flip: bool = False
    crop: tuple[int, int] | None = None  # (h, w); None -> bundle default
    stride: tuple[int, int] | None = None
    return_probabilities: bool = False


@dataclass
class SegmentResult:
    labels: np.ndarray  # (H, W) original size; uint8 if classes <= 256 else uint16
    timings: dict[str, float]  # seconds: preprocess, queue_wait, inference, postprocess
    num_inputs: int  # model inputs this request needed (windows x scales x flips)
    probabilities: np.ndarray | None = None  # (C, H, W) float32 when asked


@dataclass(frozen=True)
class PassPlan:
    """One forward pass of the image: its resized size, flip and windows on the resized image."""

    height: int
    width: int
    flip: bool
    windows: tuple[Window, ...]


@dataclass(frozen=True)
class Plan:
    mode: Literal["whole", "slide"]
    passes: tuple[PassPlan, ...]

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


def plan_request(
    test_config: TestConfig,
    options: SegmentOptions,
    height: int,
    width: int,
    max_pixels: int,
    max_inputs: int,
) -> Plan:
    """Turn options and an image size into passes and windows; refuse bad options by name, and
    a request needing more than ``max_inputs`` model inputs before any window is listed (tiny
    strides on a big image would otherwise take the memory of millions of windows)."""
    mode = options.mode or test_config.mode
    if mode not in ("whole", "slide"):
        raise InvalidParameterError(f"mode must be 'whole' or 'slide', got {mode!r}")
    crop = stride = None
    if mode == "slide":
        crop = _pair(options.crop or test_config.crop, "crop")
        stride = _pair(options.stride or test_config.stride, "stride")
        if min(crop) < 1 or max(crop) > MAX_CROP_SIDE:
            raise InvalidParameterError(f"crop sides must be in 1..{MAX_CROP_SIDE}, got {crop}")
        if min(stride) < 1 or stride[0] > crop[0] or stride[1] > crop[1]:
            raise InvalidParameterError(
                f"stride must be positive and at most the crop {crop}, got {stride}"
            )
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
        if not options.scales or len(options.scales) > MAX_SCALES:
            raise InvalidParameterError(f"scales must hold 1..{MAX_SCALES} ratios")
        for ratio in options.scales:
            if not (isinstance(ratio, int | float) and math.isfinite(ratio)):
                raise InvalidParameterError(f"scale ratio {ratio!r} is not a number")
            if not 0 < ratio <= MAX_RATIO:
                raise InvalidParameterError(
                    f"scale ratios must be in (0, {MAX_RATIO}], got {ratio}"
                )
        sizes = [ratio_size(width, height, ratio) for ratio in options.scales]

    flips = 2 if options.flip else 1
    inputs = 0
    for scaled_w, scaled_h in sizes:
        if scaled_w < 1 or scaled_h < 1:
            raise InvalidParameterError(f"a scale makes the {width}x{height} image empty")
        if scaled_w * scaled_h > max_pixels:
            raise InvalidParameterError(
                f"a scale makes the image {scaled_w}x{scaled_h}, over {max_pixels} pixels"
            )
        if crop is not None and stride is not None:
            rows = grid_count(scaled_h, crop[0], stride[0])
            inputs += rows * grid_count(scaled_w, crop[1], stride[1]) * flips
        else:
            inputs += flips
    if inputs > max_inputs:
        raise InvalidParameterError(
            f"this request needs {inputs} model inputs (windows x scales x flips), the limit is "
            f"{max_inputs}: use a larger stride or crop, or fewer scales"
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
    return Plan(mode, tuple(passes))


class _Merge:
    """One pass's logits as its windows' outputs arrive.

    A single window (whole mode, or an image within one crop) keeps the raw model output: its
    resize to the image happens in the final step. Several windows are either kept as they are,
    for ``labelmap.pass_labels`` to merge only where and for the classes it needs (labels of a
    single pass, when they take no more memory than the merged buffer), or resized to their
    windows and summed at the resized image size, then divided by the per-pixel count.
    """

    def __init__(self, plan: PassPlan, keep_windows: bool) -> None:
        self.plan = plan
        self._lock = threading.Lock()
        self._sum: np.ndarray | None = None
        self._keeps_windows = keep_windows
        self._windows: np.ndarray | None = None  # (windows, C, h, w), filled as they arrive

    @property
    def keeps_windows(self) -> bool:
        return self._keeps_windows

    def window_logits(self) -> np.ndarray:
        """The kept logits, (windows, C, h, w) in window order (every window has arrived)."""
        assert self._windows is not None
        return self._windows

    def add(self, index: int, logits: np.ndarray) -> None:
        """Merge the (C, h, w) logits of window ``index`` (thread-safe)."""
        if self._keeps_windows:
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

    def logits(self) -> np.ndarray:
        """(C, h, w) for a single window, else the count-normalised sum at the resized size."""
        assert self._sum is not None, "no window merged"
        if len(self.plan.windows) > 1:
            self._sum /= window_counts(self.plan.height, self.plan.width, list(self.plan.windows))
        return self._sum


@dataclass
class _Request:
    owner: object
    slots: asyncio.Semaphore
    stats: BatchStats = field(default_factory=BatchStats)
    preprocess_s: float = 0.0
    postprocess_s: float = 0.0


def _stack(planes: Iterator[np.ndarray], channels: int, size: tuple[int, int]) -> np.ndarray:
    stacked = np.empty((channels, *size), np.float32)
    for channel, plane in enumerate(planes):
        stacked[channel] = plane
    return stacked


async def _all_or_none(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """``gather`` that cancels the siblings when one fails, so no orphan keeps submitting."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _timed(fn: Callable[[], T]) -> Callable[[], tuple[T, float]]:
    def run() -> tuple[T, float]:
        started = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - started

    return run


class Engine:
    """Serves one bundle: session, batch thread and the request pipeline."""

    def __init__(self, bundle: Bundle, config: EngineConfig | None = None) -> None:
        self.name = bundle.name
        self.bundle = bundle
        self.config = config or EngineConfig()
        self.provider = ""
        metadata = bundle.metadata
        self._input = metadata.input
        self._num_classes = metadata.num_classes
        self._output_stride = metadata.output.stride
        self._mean = np.asarray(self._input.mean, np.float32).reshape(3, 1, 1)
        self._inv_std = (1.0 / np.asarray(self._input.std, np.float32)).reshape(3, 1, 1)
        self._normalise = not self._input.normalized_in_graph
        if self._input.dtype == "uint8" and self._normalise:
            raise BundleError(f"{bundle.path}: a uint8 input must be normalised in the graph")
        self._runtime: Runtime | None = None
        self._batcher: Batcher | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight = self.config.max_inputs_in_flight or 2 * self.config.max_batch_size

    @property
    def queue_depth(self) -> int:
        return self._batcher.depth if self._batcher is not None else 0

    @property
    def started(self) -> bool:
        return self._batcher is not None

    def start(self) -> None:
        """Create the session, start the batch thread, warm up (and check placement on CUDA)."""
        if self._batcher is not None:
            return
        config = self.config
        runtime = Runtime(
            self.bundle.model_path,
            self._input.name,
            self.bundle.metadata.output.name,
            self._input.dtype,
            RuntimeSettings(
                providers=config.providers,
                allow_cpu_fallback=config.allow_cpu_fallback,
                intra_op_threads=config.intra_op_threads,
                allow_cpu_nodes=config.allow_cpu_nodes,
                gpu_mem_limit_bytes=config.gpu_mem_limit_bytes,
            ),
        )
        warm_input = self._warmup_input()
        if runtime.provider == CUDA:
            runtime.check_placement(warm_input[None])
        runtime.run(warm_input[None])
        labelmap.warm_up()
        self._runtime = runtime
        self.provider = runtime.provider
        self._pool = ThreadPoolExecutor(
            max_workers=default_intra_op_threads(), thread_name_prefix=f"engine-{self.name}"
        )
        self._batcher = Batcher(
            runtime.run,
            model_name=self.name,
            max_batch_size=config.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_ms / 1000.0,
            max_queue_size=config.max_queue_size,
        )
        self._batcher.start()
        metrics.MODEL_LOADED.labels(self.name, self.provider).set(1)
        log.info("model %s loaded on %s", self.name, self.provider)

    def _warmup_input(self) -> np.ndarray:
        """One input of the shape most requests will have: a crop, or a square at test scale."""
        test_config = self.bundle.metadata.test_config
        if test_config.mode == "slide" and test_config.crop is not None:
            height, width = test_config.crop
        elif test_config.resize_scale is not None:
            width, height = rescale_size(512, 512, test_config.resize_scale)
        else:
            height = width = 512
        return self._to_input(np.zeros((height, width, 3), np.uint8))

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Finish queued work (up to ``drain_timeout_s``), then stop the thread and the pool."""
        if self._batcher is None:
            return
        self._batcher.stop(drain_timeout_s)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        metrics.MODEL_LOADED.labels(self.name, self.provider).set(0)
        self._batcher = None
        self._pool = None
        self._runtime = None

    def validate_options(self, options: SegmentOptions, height: int, width: int) -> None:
        """Raise ``InvalidParameterError`` / ``PayloadTooLargeError`` for what ``segment`` would."""
        self.plan(options, height, width)

    def plan(self, options: SegmentOptions, height: int, width: int) -> Plan:
        if height < 1 or width < 1:
            raise InvalidParameterError(f"image size {width}x{height} is empty")
        if height * width > self.config.max_pixels:
            raise PayloadTooLargeError(
                f"image has {height * width} pixels, the limit is {self.config.max_pixels}"
            )
        passes = len(options.scales or (1.0,)) * (2 if options.flip else 1)
        if passes > self.config.max_tta_inputs:
            raise InvalidParameterError(
                f"{passes} test-time passes (scales x flips), the limit is "
                f"{self.config.max_tta_inputs}"
            )
        return plan_request(
            self.bundle.metadata.test_config,
            options,
            height,
            width,
            self.config.max_pixels,
            self.config.max_inputs_per_request,
        )

    async def segment(self, image: np.ndarray, options: SegmentOptions) -> SegmentResult:
        """Label map (and probabilities if asked) of an (H, W, 3) uint8 RGB image."""
        batcher = self._batcher
        if batcher is None:  # loading or stopped: retryable, like a full queue
            raise OverloadedError(f"model {self.name!r} is not running", retry_after_s=5.0)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidParameterError(
                f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}"
            )
        height, width = image.shape[:2]
        plan = self.plan(options, height, width)
        request = _Request(owner=object(), slots=asyncio.Semaphore(self._in_flight))
        batcher.admit(request.owner, min(self._in_flight, plan.num_inputs))
        try:
            async with asyncio.timeout(self.config.inference_timeout_s):
                labels, probabilities = await self._labels(
                    image, plan, request, options.return_probabilities
                )
        except TimeoutError:
            raise InferenceTimeoutError(
                f"inference took longer than {self.config.inference_timeout_s} s"
            ) from None
        finally:
            batcher.release(request.owner)
        stats = request.stats
        timings = {
            "preprocess": request.preprocess_s,
            "queue_wait": stats.queue_wait_s / max(stats.inputs, 1),
            "inference": stats.inference_s,
            "postprocess": request.postprocess_s,
        }
        for stage, seconds in timings.items():
            metrics.STAGE_LATENCY.labels(self.name, stage).observe(seconds)
        metrics.WINDOWS_PER_REQUEST.labels(self.name).observe(plan.num_inputs)
        metrics.IMAGES.labels(self.name).inc()
        metrics.PIXELS.labels(self.name).inc(height * width)
        return SegmentResult(labels, timings, plan.num_inputs, probabilities)

    async def _compute(self, request: _Request, fn: Callable[[], T], pre: bool = False) -> T:
        """Run ``fn`` in the worker pool, charging its time to pre- or post-processing."""
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            if pool is None:
                raise RuntimeError("no pool")
            work = loop.run_in_executor(pool, _timed(fn))
        except RuntimeError:  # the pool is gone or shut down: stop() outlasted its drain time
            raise self._stopped_error() from None
        value, seconds = await work
        if pre:
            request.preprocess_s += seconds
        else:
            request.postprocess_s += seconds
        return value

    async def _labels(
        self, image: np.ndarray, plan: Plan, request: _Request, with_probabilities: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Label map, and (C, H, W) probabilities when asked: argmax of the logits for a single
        pass, of the mean softmax over passes otherwise."""
        original = image.shape[:2]
        if len(plan.passes) == 1:
            pass_plan = plan.passes[0]
            scaled = (pass_plan.height, pass_plan.width)
            tile_wise = not with_probabilities and not pass_plan.flip
            merge = await self._run_pass(
                image, pass_plan, request, tile_wise and self._keeps_windows(pass_plan)
            )
            if not tile_wise:
                logits = await self._compute(request, merge.logits)
                return await self._compute(
                    request, partial(self._single_pass_probabilities, logits, pass_plan, original)
                )
            if merge.keeps_windows:
                windows, logits = pass_plan.windows, merge.window_logits()
            else:  # merged at the resized size: one window covering the resized image
                windows = (Window(0, scaled[0], 0, scaled[1]),)
                logits = (await self._compute(request, merge.logits))[None]
            labelled = await self._compute(
                request,
                partial(
                    labelmap.pass_labels,
                    windows,
                    logits,
                    scaled,
                    original,
                    labels_dtype(self._num_classes),
                ),
            )
            return labelled.labels, None
        total: np.ndarray | None = None
        # A pass and its flipped twin share shapes, so they run together and share batches.
        groups: dict[tuple[int, int], list[PassPlan]] = {}
        for pass_plan in plan.passes:
            groups.setdefault((pass_plan.height, pass_plan.width), []).append(pass_plan)
        for group in groups.values():
            merges = await _all_or_none(self._run_pass(image, p, request) for p in group)
            for pass_plan, merge in zip(group, merges, strict=True):
                logits = await self._compute(request, merge.logits)
                total = await self._compute(
                    request, partial(self._accumulate, total, logits, pass_plan, original)
                )
        assert total is not None

        def finish(total: np.ndarray = total) -> tuple[np.ndarray, np.ndarray | None]:
            total /= len(plan.passes)
            labels = argmax_planes(total, labels_dtype(self._num_classes))
            return labels, total if with_probabilities else None

        return await self._compute(request, finish)

    def _single_pass_probabilities(
        self, logits: np.ndarray, pass_plan: PassPlan, original: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        scaled = (pass_plan.height, pass_plan.width)
        dtype = labels_dtype(self._num_classes)
        planes = planes_to_original(logits, scaled, pass_plan.flip, original)
        scores = _stack(planes, logits.shape[0], original)
        labels = argmax_planes(scores, dtype)
        return labels, softmax(scores)

    @staticmethod
    def _accumulate(
        total: np.ndarray | None,
        logits: np.ndarray,
        pass_plan: PassPlan,
        original: tuple[int, int],
    ) -> np.ndarray:
        """Add one pass's softmax at the original size to the running TTA sum."""
        planes = planes_to_original(
            logits, (pass_plan.height, pass_plan.width), pass_plan.flip, original
        )
        probabilities = softmax(_stack(planes, logits.shape[0], original))
        if total is None:
            return probabilities
        total += probabilities
        return total

    def _keeps_windows(self, pass_plan: PassPlan) -> bool:
        """Whether a labels-only pass keeps its window logits for ``pass_labels``: when they take
        no more memory than the merged buffer would (windows at most ``stride`` apart; always
        for a single window, which is kept as it is)."""
        window_pixels = sum(w.height * w.width for w in pass_plan.windows)
        return window_pixels <= pass_plan.height * pass_plan.width * self._output_stride**2

    async def _run_pass(
        self, image: np.ndarray, pass_plan: PassPlan, request: _Request, keep_windows: bool = False
    ) -> _Merge:
        """Resize (and flip) the image, stream its windows through the batcher, merge them."""

        def prepare() -> np.ndarray:
            scaled = resize_image(image, pass_plan.width, pass_plan.height)
            return scaled[:, ::-1] if pass_plan.flip else scaled

        scaled = await self._compute(request, prepare, pre=True)
        merge = _Merge(pass_plan, keep_windows)
        await _all_or_none(
            self._run_window(scaled, index, merge, request)
            for index in range(len(pass_plan.windows))
        )
        return merge

    async def _run_window(
        self, scaled: np.ndarray, index: int, merge: _Merge, request: _Request
    ) -> None:
        window = merge.plan.windows[index]
        async with request.slots:
            if self._batcher is None:
                raise self._stopped_error()
            crop = scaled[window.y1 : window.y2, window.x1 : window.x2]
            tensor = await self._compute(request, lambda: self._to_input(crop), pre=True)
            future = self._batcher.submit(tensor, request.owner, request.stats)
            try:
                logits = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if future.cancelled() and task is not None and task.cancelling() == 0:
                    # Dropped by a shutdown that outlasted its drain time, not by our caller.
                    raise self._stopped_error() from None
                raise
            await self._compute(request, lambda: merge.add(index, logits))

    def _stopped_error(self) -> OverloadedError:
        return OverloadedError(
            f"model {self.name!r} stopped before this request finished", retry_after_s=5.0
        )

    def _to_input(self, pixels: np.ndarray) -> np.ndarray:
        """HWC uint8 -> CHW in the graph's input dtype, normalised here when the graph does not."""
        chw = pixels.transpose(2, 0, 1)
        if not self._normalise:
            return chw.astype(self._input.dtype)  # astype copies into a contiguous array
        normalised = (chw.astype(np.float32) - self._mean) * self._inv_std
        return normalised.astype(self._input.dtype, copy=False)


class ModelManager:
    """Every bundle of a model repository, each behind its own engine."""

    def __init__(
        self,
        repository: Path,
        config: EngineConfig,
        per_model: dict[str, EngineConfig] | None = None,
    ) -> None:
        self.repository = Path(repository)
        self.config = config
        self.per_model = dict(per_model or {})
        self._engines: dict[str, Engine] = {}
        self._loaded = False
        self.default_name: str | None = None

    @property
    def ready(self) -> bool:
        """True once every bundle is loaded and warm, until ``stop``."""
        return self._loaded and all(e.started for e in self._engines.values())

    def load_all(self) -> None:
        """Load and warm every bundle; a missing or invalid one fails the whole start-up."""
        paths = discover_bundles(self.repository)
        if not paths:
            raise BundleError(
                f"{self.repository}: no model bundles (directories with segserve.json)"
            )
        unknown = set(self.per_model) - {p.name for p in paths}
        if unknown:
            raise BundleError(
                f"settings name models that are not in the repository: {sorted(unknown)}"
            )
        bundles = [load_bundle(path) for path in paths]
        for bundle in bundles:
            engine = Engine(bundle, self.per_model.get(bundle.name, self.config))
            engine.start()
            self._engines[bundle.name] = engine
        self.default_name = bundles[0].name
        self._loaded = True

    def get(self, name: str | None) -> Engine:
        key = name if name is not None else self.default_name
        if key is None or key not in self._engines:
            known = ", ".join(self._engines) or "none"
            raise UnknownModelError(f"no model named {name!r}; loaded: {known}")
        return self._engines[key]

    def names(self) -> list[str]:
        return list(self._engines)

    def stop(self, drain_timeout_s: float) -> None:
        """Drain and stop every engine (each gets up to ``drain_timeout_s``)."""
        self._loaded = False
        engines = list(self._engines.values())
        if engines:  # drain side by side so the total wait is one drain time, not one per model
            with ThreadPoolExecutor(max_workers=len(engines)) as pool:
                list(pool.map(lambda engine: engine.stop(drain_timeout_s), engines))
