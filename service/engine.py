"""The inference engine: one per loaded bundle, mmsegmentation 1.x test-time semantics.

A request arrives planned (``service/planning.py``: one pass per TTA ratio and flip, each pass a
list of windows), its inputs are streamed through the model's ``Batcher`` with a bounded number in
flight, and every output is merged into its pass's buffer as it arrives (``service/merging.py``),
so memory follows the image size, not the number of windows. One pass: argmax of its logits (for
labels only computed tile by tile by ``labelmap.pass_labels``, without full-size class planes).
Several: argmax of the mean of their softmax (``SegTTAModel``), computed tile by tile by
``ttamap.mean_softmax`` from each pass's logits at its own resolution, probabilities included.
Scale ratios apply to the image as loaded (mmseg 1.x), not to the dataset's test scale.

Compute runs in a small thread pool and the batch threads; the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np

from service import labelmap, metrics, ttamap
from service.batcher import Batcher, BatchStats
from service.bundle import Bundle, BundleError
from service.config import EngineConfig
from service.cuda_graphs import capture_batch_sizes
from service.device_postprocess import DeviceBatch, DevicePassMerge, DevicePostprocess
from service.errors import InferenceTimeoutError, InvalidParameterError, OverloadedError
from service.geometry import (
    labels_dtype,
    rescale_size,
    resize_image,
    unpad_logits,
)
from service.merging import PassMerge, keep_windows, single_pass_probabilities
from service.planning import PassPlan, Plan, SegmentOptions, plan_request
from service.runtime import CUDA, Runtime, default_intra_op_threads

log = logging.getLogger(__name__)

T = TypeVar("T")
Merge = TypeVar("Merge", PassMerge, DevicePassMerge)


@dataclass
class SegmentResult:
    labels: np.ndarray  # (H, W) original size; uint8 if classes <= 256 else uint16
    timings: dict[str, float]  # seconds: preprocess, queue_wait, inference, postprocess
    num_inputs: int  # model inputs this request needed (windows x scales x flips)
    probabilities: np.ndarray | None = None  # (C, H, W) float32 when asked


@dataclass
class _Request:
    owner: object
    slots: asyncio.Semaphore
    stats: BatchStats = field(default_factory=BatchStats)
    preprocess_s: float = 0.0
    postprocess_s: float = 0.0


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


def compile_kernels() -> None:
    """Compile, or load from Numba's cache, the post-processing kernels every engine runs. The
    image bakes its cache with this (Dockerfile): baking the label-map kernels alone left a
    container compiling the TTA ones (about 30 s) at every start."""
    labelmap.warm_up()
    ttamap.warm_up()


class Engine:
    """Serves one bundle: sessions, batch threads and the request pipeline."""

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
        # Windows under the graph's minimum side are padded with the mean colour (0 once
        # normalised: mmseg's test-time pad value) and the padding cropped off their logits.
        self._min_side = metadata.min_input_side
        self._pad_value = np.zeros(3) if self._normalise else np.asarray(self._input.mean)
        if self._input.dtype == "uint8":
            self._pad_value = np.rint(self._pad_value)
        if self._input.dtype == "uint8" and self._normalise:
            raise BundleError(f"{bundle.path}: a uint8 input must be normalised in the graph")
        self._runtime: Runtime | None = None
        self._device_post: DevicePostprocess | None = None
        self.postprocess = ""  # "host" or "device" once started
        self.aligned_side = 0  # the runtime's, once started (service/aligned.py)
        self._batcher: Batcher | None = None
        self._pool: ThreadPoolExecutor | None = None
        # A request reserves this many queue places: never more than the queue has.
        self._in_flight = min(
            self.config.max_inputs_in_flight or 2 * self.config.max_batch_size,
            self.config.max_queue_size,
        )

    @property
    def queue_depth(self) -> int:
        return self._batcher.depth if self._batcher is not None else 0

    @property
    def started(self) -> bool:
        return self._batcher is not None

    def start(self) -> None:
        """Create the sessions, start the batch threads, warm up (and check placement on CUDA)."""
        if self._batcher is not None:
            return
        config = self.config
        runtime = Runtime(
            self.bundle.model_path,
            self._input.name,
            self.bundle.metadata.output.name,
            self._input.dtype,
            config.runtime,
            aligned_side=self.bundle.metadata.aligned_side,
        )
        warm_input = self._warmup_input()
        if runtime.provider == CUDA:
            runtime.check_placement(warm_input[None])
        runtime.warm_up(warm_input[None])
        if config.runtime.cuda_graphs:
            runtime.capture_cuda_graphs(
                [(size, *warm_input.shape) for size in capture_batch_sizes(config.max_batch_size)]
            )
        compile_kernels()
        device_post = self._device_postprocess(runtime)
        self._runtime = runtime
        self._device_post = device_post
        self.provider = runtime.provider
        self.aligned_side = runtime.aligned_side
        self.postprocess = "host" if device_post is None else "device"
        self._pool = ThreadPoolExecutor(
            max_workers=default_intra_op_threads(), thread_name_prefix=f"engine-{self.name}"
        )
        self._batcher = Batcher(
            runtime.run
            if device_post is None
            else lambda batch, alone, stop: DeviceBatch(runtime.run_on_device(batch, alone, stop)),
            model_name=self.name,
            max_batch_size=config.max_batch_size,
            max_batch_pixels=config.max_batch_pixels,
            max_queue_delay_s=config.max_queue_delay_ms / 1000.0,
            max_queue_size=config.max_queue_size,
            parallel_runs=runtime.parallel_runs,
        )
        self._batcher.start()
        metrics.MODEL_LOADED.labels(self.name, self.provider).set(1)
        log.info(
            "model %s loaded on %s, post-processing on the %s",
            self.name,
            self.provider,
            self.postprocess,
        )
        if not self.bundle.metadata.trained:
            log.warning(
                "model %s is UNTRAINED (exported with --random-init): its masks are meaningless",
                self.name,
            )

    def _device_postprocess(self, runtime: Runtime) -> DevicePostprocess | None:
        """Post-processing sessions on the model's provider (warmed up), or None to post-process
        on the host; ``postprocess="auto"`` means device under CUDA."""
        setting = self.config.postprocess
        if setting == "host" or (setting == "auto" and runtime.provider != CUDA):
            return None
        device_post = DevicePostprocess(
            runtime.device,
            runtime.postprocess_providers(),
            runtime.intra_op_threads,
            self._num_classes,
            labels_dtype(self._num_classes),
        )
        device_post.warm_up(np.dtype(self.bundle.metadata.output.dtype))
        return device_post

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
        """Finish queued work (up to ``drain_timeout_s``), then stop the threads and the pool."""
        if self._batcher is None:
            return
        self._batcher.stop(drain_timeout_s)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        metrics.MODEL_LOADED.labels(self.name, self.provider).set(0)
        self._batcher = None
        self._pool = None
        self._runtime = None
        self._device_post = None

    def plan(self, options: SegmentOptions, height: int, width: int) -> Plan:
        """The passes and windows of a request on a ``height`` x ``width`` image; raises
        ``InvalidParameterError`` / ``PayloadTooLargeError`` for options over the limits."""
        return plan_request(self.bundle.metadata, options, height, width, self.config.limits)

    async def segment(self, image: np.ndarray, options: SegmentOptions) -> SegmentResult:
        """Label map (and probabilities if asked) of an (H, W, 3) uint8 RGB image."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidParameterError(
                f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}"
            )
        return await self.run(image, self.plan(options, *image.shape[:2]))

    async def run(self, image: np.ndarray, plan: Plan) -> SegmentResult:
        """Run ``plan`` (made by ``plan`` for this image's size)."""
        batcher = self._batcher
        if batcher is None:  # loading or stopped: retryable, like a full queue
            raise OverloadedError(
                f"model {self.name!r} is not running", "stopped", retry_after_s=5.0
            )
        height, width = image.shape[:2]
        if image.dtype != np.uint8 or (height, width) != (plan.height, plan.width):
            raise ValueError(
                f"the plan is for {plan.width}x{plan.height} uint8 RGB, not {image.shape}"
            )
        request = _Request(owner=object(), slots=asyncio.Semaphore(self._in_flight))
        batcher.admit(request.owner, min(self._in_flight, plan.num_inputs))
        try:
            async with asyncio.timeout(self.config.inference_timeout_s):
                labels, probabilities = await self._labels(image, plan, request)
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
        self, image: np.ndarray, plan: Plan, request: _Request
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Label map, and (C, H, W) probabilities when asked: argmax of the logits for a single
        pass, of the mean softmax over passes otherwise."""
        if self._device_post is not None:
            return await self._device_labels(image, plan, request, self._device_post)
        original = image.shape[:2]
        dtype = labels_dtype(self._num_classes)
        if len(plan.passes) == 1:
            pass_plan = plan.passes[0]
            tile_wise = not plan.probabilities and not pass_plan.flip
            merge = await self._run_pass(
                image,
                PassMerge(pass_plan, tile_wise and keep_windows(pass_plan, self._output_stride)),
                request,
            )
            if not tile_wise:
                logits = await self._compute(request, merge.logits)
                return await self._compute(
                    request, partial(single_pass_probabilities, logits, pass_plan, original)
                )
            # A single window's output is handed over as it came: no pool hop (0.1-0.2 ms) for it.
            single = len(pass_plan.windows) == 1
            one = merge.pass_logits() if single else await self._compute(request, merge.pass_logits)
            labelled = await self._compute(
                request,
                partial(labelmap.pass_labels, one.windows, one.logits, one.scaled, original, dtype),
            )
            return labelled.labels, None
        # A pass and its flipped twin share shapes, so they run together and share batches.
        groups: dict[tuple[int, int], list[PassPlan]] = {}
        for pass_plan in plan.passes:
            groups.setdefault((pass_plan.height, pass_plan.width), []).append(pass_plan)
        passes: list[ttamap.PassLogits] = []
        for group in groups.values():
            merges = await _all_or_none(
                self._run_pass(image, PassMerge(p, keep_windows(p, self._output_stride)), request)
                for p in group
            )
            for merge in merges:
                passes.append(await self._compute(request, merge.pass_logits))
        mean = await self._compute(
            request,
            partial(ttamap.mean_softmax, passes, original, dtype, plan.probabilities),
        )
        return mean.labels, mean.probabilities

    async def _device_labels(
        self, image: np.ndarray, plan: Plan, request: _Request, device_post: DevicePostprocess
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``_labels`` with the merging, resizes, softmax and argmax on the model's device
        (``service/device_postprocess.py``): only the results are copied to the host."""
        original = (plan.height, plan.width)
        if len(plan.passes) == 1:
            merge = await self._run_pass(image, device_post.new_pass(plan.passes[0]), request)
            return await self._compute(
                request, partial(device_post.pass_result, merge, original, plan.probabilities)
            )
        total = None
        groups: dict[tuple[int, int], list[PassPlan]] = {}  # as in _labels
        for pass_plan in plan.passes:
            groups.setdefault((pass_plan.height, pass_plan.width), []).append(pass_plan)
        for group in groups.values():
            merges = await _all_or_none(
                self._run_pass(image, device_post.new_pass(p), request) for p in group
            )
            for merge in merges:
                total = await self._compute(
                    request, partial(device_post.add_softmax, total, merge, original)
                )
        assert total is not None
        return await self._compute(
            request,
            partial(device_post.mean_result, total, len(plan.passes), plan.probabilities),
        )

    async def _run_pass(self, image: np.ndarray, merge: Merge, request: _Request) -> Merge:
        """Resize (and flip) the image, stream its windows through the batcher into ``merge``."""
        pass_plan = merge.plan

        def prepare() -> np.ndarray:
            scaled = resize_image(image, pass_plan.width, pass_plan.height)
            return scaled[:, ::-1] if pass_plan.flip else scaled

        unchanged = (pass_plan.height, pass_plan.width) == image.shape[:2] and not pass_plan.flip
        scaled = image if unchanged else await self._compute(request, prepare, pre=True)
        await _all_or_none(
            self._run_window(scaled, index, merge, request)
            for index in range(len(pass_plan.windows))
        )
        return merge

    async def _run_window(
        self,
        scaled: np.ndarray,
        index: int,
        merge: PassMerge | DevicePassMerge,
        request: _Request,
    ) -> None:
        window = merge.plan.windows[index]
        async with request.slots:
            crop = scaled[window.y1 : window.y2, window.x1 : window.x2]
            tensor = await self._compute(request, lambda: self._padded_input(crop), pre=True)
            batcher = self._batcher  # read after the await: stop() may have run meanwhile
            if batcher is None:
                raise self._stopped_error()
            future = batcher.submit(tensor, request.owner, request.stats)
            try:
                logits = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if future.cancelled() and task is not None and task.cancelling() == 0:
                    # Dropped by a shutdown that outlasted its drain time, not by our caller.
                    raise self._stopped_error() from None
                raise
            padded, size = tensor.shape[1:], crop.shape[:2]
            if padded != size:
                unpad = unpad_logits if self._device_post is None else self._device_post.unpad
                logits = await self._compute(request, partial(unpad, logits, padded, size))
            if len(merge.plan.windows) == 1:  # kept as it came (both merges): nothing to compute
                merge.add(index, logits)
            else:
                await self._compute(request, lambda: merge.add(index, logits))

    def _stopped_error(self) -> OverloadedError:
        return OverloadedError(
            f"model {self.name!r} stopped before this request finished",
            "stopped",
            retry_after_s=5.0,
        )

    def _padded_input(self, pixels: np.ndarray) -> np.ndarray:
        """The model input of one window, padded bottom/right up to the graph's minimum side."""
        tensor = self._to_input(pixels)
        height, width = tensor.shape[1:]
        if min(height, width) >= self._min_side:
            return tensor
        padded = np.empty(
            (3, max(height, self._min_side), max(width, self._min_side)), tensor.dtype
        )
        padded[...] = self._pad_value.reshape(3, 1, 1)
        padded[:, :height, :width] = tensor
        return padded

    def _to_input(self, pixels: np.ndarray) -> np.ndarray:
        """HWC uint8 -> CHW in the graph's input dtype, normalised here when the graph does not."""
        chw = pixels.transpose(2, 0, 1)
        if not self._normalise:
            return chw.astype(self._input.dtype)  # astype copies into a contiguous array
        normalised = (chw.astype(np.float32) - self._mean) * self._inv_std
        return normalised.astype(self._input.dtype, copy=False)
