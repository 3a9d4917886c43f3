"""The engine under load and misuse: batching across requests, refusal, cancellation, timeouts,
option validation, providers and placement, and the model manager."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service import metrics
from service.batcher import RunStop
from service.bundle import Bundle, BundleError
from service.config import EngineConfig, Limits, RuntimeSettings
from service.engine import Engine
from service.errors import (
    InferenceTimeoutError,
    InvalidParameterError,
    OverloadedError,
    PayloadTooLargeError,
    UnknownModelError,
)
from service.geometry import resize_image
from service.heap import RELEASE_PIXELS
from service.manager import ModelManager
from service.planning import SegmentOptions
from service.runtime import (
    CPU,
    CUDA,
    PlacementError,
    ProviderUnavailableError,
    Runtime,
    misplaced_nodes,
    resolve_providers,
    started_provider,
)

HAS_CUDA = CUDA in ort.get_available_providers()


def batches_run(name: str) -> tuple[float, float]:
    """(inputs run, batches run) so far for a model, from the batch-size histogram."""
    histogram = metrics.BATCH_SIZE.labels(name)
    return histogram._sum.get(), sum(bucket.get() for bucket in histogram._buckets)


def test_concurrent_requests_share_batches_and_match_sequential(
    tiny_bundle: Bundle, photos: dict[str, np.ndarray]
) -> None:
    images = [resize_image(photos[n], 240, 160) for n in ("astronaut", "chelsea", "coffee")] * 2
    alone = Engine(tiny_bundle, EngineConfig())
    alone.start()
    try:
        sequential = [
            asyncio.run(alone.segment(image, SegmentOptions())).labels for image in images
        ]
    finally:
        alone.stop()
    # A long delay so that even a loaded machine fills the batches before the oldest input goes;
    # one run at a time, since parallel runs split a backlog between them (tested on their own).
    config = EngineConfig(
        max_batch_size=4, max_queue_delay_ms=1000, runtime=RuntimeSettings(parallel_runs=1)
    )
    engine = Engine(tiny_bundle, config)
    engine.start()
    try:
        inputs_before, batches_before = batches_run(tiny_bundle.name)

        async def together() -> list[np.ndarray]:
            results = await asyncio.gather(
                *(engine.segment(image, SegmentOptions()) for image in images)
            )
            return [r.labels for r in results]

        concurrent = asyncio.run(together())
        inputs_after, batches_after = batches_run(tiny_bundle.name)
    finally:
        engine.stop()
    for alone, shared in zip(sequential, concurrent, strict=True):
        assert (alone == shared).mean() >= 0.999
    assert inputs_after - inputs_before == 6
    assert batches_after - batches_before <= 3  # six equal-shape inputs in batches of <= 4


def test_parallel_runs_give_the_labels_of_runs_alone(
    tiny_bundle: Bundle, photos: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests at once run beside each other on single-thread sessions (counted in
    ``segserve_runs_beside_total``), with the labels each gets alone on both threads."""
    images = [resize_image(photos[n], 240, 160) for n in ("astronaut", "chelsea", "coffee")] * 3
    runtime = RuntimeSettings(providers=("cpu",), intra_op_threads=2, parallel_runs=2)
    engine = Engine(tiny_bundle, EngineConfig(max_batch_size=1, runtime=runtime))
    original_run = Runtime.run
    backlog = [0]  # inputs the run alone waits for, so that the rest queue behind it

    def run(
        runtime: Runtime, batch: np.ndarray, alone: bool = True, stop: RunStop | None = None
    ) -> np.ndarray:
        deadline = time.monotonic() + 5
        while engine.queue_depth < backlog[0] and time.monotonic() < deadline:
            time.sleep(0.005)
        backlog[0] = 0
        return original_run(runtime, batch, alone, stop)

    monkeypatch.setattr(Runtime, "run", run)
    engine.start()
    beside = metrics.RUNS_BESIDE.labels(tiny_bundle.name)
    try:
        before = beside._value.get()
        alone = [asyncio.run(engine.segment(image, SegmentOptions())).labels for image in images]
        assert beside._value.get() == before  # one at a time: every run alone

        async def together() -> list[np.ndarray]:
            results = await asyncio.gather(
                *(engine.segment(image, SegmentOptions()) for image in images)
            )
            return [r.labels for r in results]

        backlog[0] = len(images) - 2  # all but the run alone, or two held side by side
        concurrent = asyncio.run(together())
        assert beside._value.get() - before >= 2  # the first two after the one alone at least
    finally:
        engine.stop()
    for one, other in zip(alone, concurrent, strict=True):
        np.testing.assert_array_equal(one, other)


def test_full_queue_refuses_with_overloaded(
    tiny_float_bundle: Bundle, photos: dict[str, np.ndarray]
) -> None:
    engine = Engine(tiny_float_bundle, EngineConfig(max_queue_size=4, max_inputs_in_flight=4))
    engine.start()

    async def burst() -> list[object]:
        return await asyncio.gather(
            *(engine.segment(photos["coffee"], SegmentOptions()) for _ in range(3)),
            return_exceptions=True,
        )

    try:
        outcomes = asyncio.run(burst())
    finally:
        engine.stop()
    refused = [o for o in outcomes if isinstance(o, OverloadedError)]
    served = [o for o in outcomes if not isinstance(o, BaseException)]
    # The first request reserves all four places (8 windows, 4 in flight); the others are refused.
    assert len(served) == 1 and len(refused) == 2
    assert all(o.retry_after_s > 0 for o in refused)


def test_cancelled_request_drops_its_queued_windows(
    tiny_float_bundle: Bundle, photos: dict[str, np.ndarray]
) -> None:
    # One input per batch and a long batch delay keep most windows queued while we cancel.
    engine = Engine(
        tiny_float_bundle,
        EngineConfig(max_batch_size=64, max_queue_delay_ms=300, max_inputs_in_flight=64),
    )
    engine.start()
    options = SegmentOptions(crop=(32, 32), stride=(16, 16))
    planned = engine.plan(options, *photos["coffee"].shape[:2]).num_inputs
    inputs_before, _ = batches_run(tiny_float_bundle.name)

    async def cancel_midway() -> int:
        task = asyncio.create_task(engine.segment(photos["coffee"], options))
        while engine.queue_depth < 8:
            await asyncio.sleep(0.005)
        depth = engine.queue_depth
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return depth

    try:
        depth_at_cancel = asyncio.run(cancel_midway())
        assert engine.queue_depth == 0
        inputs_after, _ = batches_run(tiny_float_bundle.name)
    finally:
        engine.stop()
    assert planned > 64 and depth_at_cancel >= 8
    assert inputs_after - inputs_before < planned  # the dropped windows never ran


def test_timeout_raises_and_frees_the_queue(
    tiny_float_bundle: Bundle, photos: dict[str, np.ndarray]
) -> None:
    engine = Engine(tiny_float_bundle, EngineConfig(inference_timeout_s=0.05))
    engine.start()
    try:
        with pytest.raises(InferenceTimeoutError, match=r"longer than 0\.05 s"):
            asyncio.run(
                engine.segment(photos["coffee"], SegmentOptions(scales=(1.0, 1.5, 1.75), flip=True))
            )
        assert engine.queue_depth == 0
    finally:
        engine.stop()


def test_a_forward_past_the_time_limit_is_stopped_not_left_running(
    tiny_bundle: Bundle, caplog: pytest.LogCaptureFixture
) -> None:
    """The 504 also stops the forward (onnxruntime's terminate flag): it used to run on, holding
    the model's threads and its memory, while the next request waited behind it."""
    limits = Limits(max_input_pixels=1 << 25)
    engine = Engine(tiny_bundle, EngineConfig(inference_timeout_s=0.6, limits=limits))
    engine.start()
    try:
        big = np.zeros((4096, 8192, 3), np.uint8)  # one whole-mode input: ~1.3 s of forward here
        with caplog.at_level(logging.INFO, logger="service.batcher"):
            with pytest.raises(InferenceTimeoutError):
                asyncio.run(engine.segment(big, SegmentOptions(mode="whole", scales=(1.0,))))
            deadline = time.monotonic() + 10
            while "stopped: no request waits for it" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                time.sleep(0.01)
        assert "failed" not in caplog.text
        small = np.zeros((64, 64, 3), np.uint8)
        engine.config = EngineConfig(inference_timeout_s=30, limits=limits)
        assert asyncio.run(engine.segment(small, SegmentOptions())).labels.shape == (64, 64)
    finally:
        engine.stop()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (SegmentOptions(mode="slide", crop=(64, 64), stride=(0, 32)), "stride must be positive"),
        (
            SegmentOptions(mode="slide", crop=(64, 64), stride=(96, 32)),
            r"leaves pixels 64\.\.96 uncovered along the height of a 192x160 pass",
        ),
        (SegmentOptions(mode="slide", crop=(9000, 64), stride=(32, 32)), "crop sides"),
        (SegmentOptions(mode="slide", crop=(64.5, 64), stride=(32, 32)), "two integers"),  # type: ignore[arg-type]
        (SegmentOptions(mode="slide"), "no default one"),  # bundle has no window
        (SegmentOptions(crop=(64, 64)), "slide mode only"),
        (SegmentOptions(mode="tiles"), "mode must be"),  # type: ignore[arg-type]
        (SegmentOptions(scales=()), "0 scales requested; between 1 and 8"),
        (SegmentOptions(scales=(1.0,) * 9), "9 scales requested"),
        (SegmentOptions(scales=(0.0,)), "scale ratios must be in"),
        (SegmentOptions(scales=(float("nan"),)), "not a number"),
        (SegmentOptions(scales=(1.0, 1.5, 2.0), flip=True), "6 test-time passes"),
        (SegmentOptions(scales=(3.0,)), "over 1000000 pixels"),
    ],
)
def test_bad_options_are_refused_by_name(
    tiny_bundle: Bundle, options: SegmentOptions, message: str
) -> None:
    engine = Engine(
        tiny_bundle, EngineConfig(limits=Limits(max_tta_inputs=4, max_pixels=1_000_000))
    )
    with pytest.raises(InvalidParameterError, match=message):
        engine.plan(options, 500, 600)


def test_too_many_inputs_are_refused_before_windows_are_listed(
    tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1-pixel windows on a large image would be millions of windows (gigabytes of plan): the
    count comes from the grid arithmetic before any window is listed."""
    import service.planning as engine_module

    engine = Engine(
        tiny_bundle, EngineConfig(limits=Limits(max_inputs_per_request=100, max_pixels=10**9))
    )
    listed: list[object] = []
    real_grid = engine_module.window_grid
    monkeypatch.setattr(
        engine_module, "window_grid", lambda *args: listed.append(args) or real_grid(*args)
    )
    huge = SegmentOptions(mode="slide", crop=(1, 1), stride=(1, 1), scales=(1.0, 4.0))
    with pytest.raises(InvalidParameterError, match=r"needs 102000000 model inputs.*limit is 100"):
        engine.plan(huge, 2000, 3000)  # 2000 x 3000 + 8000 x 12000 windows
    assert listed == []
    at_limit = SegmentOptions(mode="slide", crop=(10, 10), stride=(10, 10), scales=(1.0,))
    assert engine.plan(at_limit, 100, 100).num_inputs == 100
    assert listed  # once the count is allowed the grid is listed


def test_pixel_limit_and_image_checks(tiny_bundle: Bundle) -> None:
    engine = Engine(tiny_bundle, EngineConfig(limits=Limits(max_pixels=10_000)))
    with pytest.raises(PayloadTooLargeError, match="10001 pixels"):
        engine.plan(SegmentOptions(), 1, 10_001)
    engine.start()
    try:
        with pytest.raises(InvalidParameterError, match="uint8 RGB"):
            asyncio.run(engine.segment(np.zeros((8, 8, 3), np.float32), SegmentOptions()))
        with pytest.raises(InvalidParameterError, match="uint8 RGB"):
            asyncio.run(engine.segment(np.zeros((8, 8), np.uint8), SegmentOptions()))
    finally:
        engine.stop()


def test_provider_resolution() -> None:
    available = [CPU]
    assert resolve_providers(("cuda", "cpu"), available, allow_cpu_fallback=True) == [CPU]
    assert resolve_providers(("cpu",), available, allow_cpu_fallback=False) == [CPU]
    assert resolve_providers(("cuda", "cpu"), [CUDA, CPU], allow_cpu_fallback=False) == [CUDA, CPU]
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider requested"):
        resolve_providers(("cuda", "cpu"), available, allow_cpu_fallback=False)
    with pytest.raises(ProviderUnavailableError, match="unknown provider 'tpu'"):
        resolve_providers(("tpu",), available, allow_cpu_fallback=True)
    # Only a GPU asked for, fallback allowed: CPU, with a warning.
    assert resolve_providers(("cuda",), available, allow_cpu_fallback=True) == [CPU]


def test_a_session_that_fell_back_from_the_gpu_is_refused_without_fallback() -> None:
    """onnxruntime-gpu lists CUDA even where its libraries or the GPU are missing; its session
    then runs on the CPU with only a log line. The session's own providers decide (this CPU
    build cannot make a CUDA session fail, so the decision is tested on what it reports)."""
    assert started_provider(CUDA, [CUDA, CPU], allow_cpu_fallback=False) == CUDA
    assert started_provider(CUDA, [CPU], allow_cpu_fallback=True) == CPU
    assert started_provider(CPU, [CPU], allow_cpu_fallback=False) == CPU
    with pytest.raises(ProviderUnavailableError, match="could not start it"):
        started_provider(CUDA, [CPU], allow_cpu_fallback=False)


def test_cpu_fallback_is_logged_and_reported(
    tiny_bundle: Bundle, caplog: pytest.LogCaptureFixture
) -> None:
    if HAS_CUDA:
        pytest.skip("CUDA is present, so there is no fallback to observe")
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        engine = Engine(
            tiny_bundle, EngineConfig(runtime=RuntimeSettings(providers=("cuda", "cpu")))
        )
        engine.start()
    try:
        assert engine.provider == CPU
        assert "CUDAExecutionProvider requested but unavailable" in caplog.text
        assert metrics.MODEL_LOADED.labels(tiny_bundle.name, CPU)._value.get() == 1
    finally:
        engine.stop()
    assert metrics.MODEL_LOADED.labels(tiny_bundle.name, CPU)._value.get() == 0
    strict = Engine(
        tiny_bundle,
        EngineConfig(runtime=RuntimeSettings(providers=("cuda",), allow_cpu_fallback=False)),
    )
    with pytest.raises(ProviderUnavailableError):
        strict.start()


def test_placement_report_flags_compute_nodes_off_the_gpu(tiny_bundle: Bundle) -> None:
    runtime = Runtime(
        tiny_bundle.model_path, "pixels", "logits", "uint8", RuntimeSettings(providers=("cpu",))
    )
    sample = np.zeros((1, 3, 64, 64), np.uint8)
    events = runtime.node_placements(sample)
    assert runtime.check_placement(sample) == []  # everything runs where the session runs
    # Read as if the session were meant to be on CUDA, every compute node is reported.
    misplaced = misplaced_nodes(events, CUDA)
    assert any("Conv on CPUExecutionProvider" in node for node in misplaced)
    assert any("(Div on" in node for node in misplaced)  # float arithmetic is compute
    shape_only = {"cat": "Node", "name": "s", "args": {"op_name": "Shape", "provider": CPU}}
    int_math = {
        "cat": "Node",
        "name": "m",
        "args": {"op_name": "Mul", "provider": CPU, "output_type_shape": [{"int64": [2]}]},
    }
    assert misplaced_nodes([shape_only, int_math], CUDA) == []


def test_model_manager_loads_every_bundle(
    model_repository: Path, photos: dict[str, np.ndarray]
) -> None:
    manager = ModelManager(
        model_repository,
        EngineConfig(runtime=RuntimeSettings(providers=("cpu",))),
        per_model={
            "tiny-float": EngineConfig(
                max_batch_size=2, runtime=RuntimeSettings(providers=("cpu",))
            )
        },
    )
    assert not manager.ready
    manager.load_all()
    try:
        assert manager.ready
        assert manager.names() == ["tiny", "tiny-float"]
        assert manager.default_name == "tiny"
        assert manager.get(None) is manager.get("tiny")
        assert manager.get("tiny-float").config.max_batch_size == 2
        assert manager.get("tiny").config.max_batch_size == 8
        with pytest.raises(UnknownModelError, match="'nope'"):
            manager.get("nope")
        image = resize_image(photos["rocket"], 96, 64)
        for name in manager.names():
            result = asyncio.run(manager.get(name).segment(image, SegmentOptions()))
            assert result.labels.shape == (64, 96)
    finally:
        manager.stop(drain_timeout_s=5)
    assert not manager.ready


def test_model_manager_refuses_empty_or_mismatched_repositories(
    tmp_path: Path, model_repository: Path
) -> None:
    with pytest.raises(BundleError, match="no model bundles"):
        ModelManager(tmp_path, EngineConfig()).load_all()
    with pytest.raises(BundleError, match="not in the repository"):
        ModelManager(
            model_repository, EngineConfig(), per_model={"ghost": EngineConfig()}
        ).load_all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime's CUDAExecutionProvider and a GPU")
def test_cuda_engine_matches_cpu_with_placement_checked(
    tiny_float_bundle: Bundle, photos: dict[str, np.ndarray]
) -> None:
    gpu = Engine(
        tiny_float_bundle,
        EngineConfig(runtime=RuntimeSettings(providers=("cuda",), allow_cpu_fallback=False)),
    )
    cpu = Engine(tiny_float_bundle, EngineConfig(runtime=RuntimeSettings(providers=("cpu",))))
    gpu.start()  # runs the placement check; raises PlacementError on CPU-placed compute nodes
    cpu.start()
    try:
        assert gpu.provider == CUDA
        options = SegmentOptions(scales=(0.75, 1.0), flip=True)
        on_gpu = asyncio.run(gpu.segment(photos["chelsea"], options))
        on_cpu = asyncio.run(cpu.segment(photos["chelsea"], options))
        assert (on_gpu.labels == on_cpu.labels).mean() >= 0.999
    finally:
        gpu.stop()
        cpu.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime's CUDAExecutionProvider and a GPU")
def test_cuda_placement_error_names_cpu_nodes(tiny_bundle: Bundle) -> None:
    runtime = Runtime(
        tiny_bundle.model_path,
        "pixels",
        "logits",
        "uint8",
        RuntimeSettings(providers=("cuda",), allow_cpu_fallback=False),
    )
    sample = np.zeros((1, 3, 64, 64), np.uint8)
    misplaced = misplaced_nodes(runtime.node_placements(sample), CUDA)
    if misplaced:
        with pytest.raises(PlacementError, match="compute nodes run on the CPU"):
            runtime.check_placement(sample)
    else:
        assert runtime.check_placement(sample) == []
    batch = np.random.default_rng(0).integers(0, 255, (3, 3, 64, 64), dtype=np.uint8)
    cpu = Runtime(
        tiny_bundle.model_path, "pixels", "logits", "uint8", RuntimeSettings(providers=("cpu",))
    )
    np.testing.assert_allclose(runtime.run(batch), cpu.run(batch), atol=1e-3)  # IO binding path


def test_stop_lets_admitted_requests_finish_and_refuses_new_ones(
    tiny_float_bundle: Bundle, photos: dict[str, np.ndarray]
) -> None:
    engine = Engine(tiny_float_bundle, EngineConfig(max_batch_size=4, max_inputs_in_flight=4))
    engine.start()
    options = SegmentOptions(crop=(32, 32), stride=(16, 16))  # 9 x 14 windows, 4 at a time

    async def scenario() -> tuple[np.ndarray, BaseException | None]:
        running = asyncio.create_task(engine.segment(photos["coffee"], options))
        while engine.queue_depth == 0:
            await asyncio.sleep(0.001)
        stopping = asyncio.create_task(asyncio.to_thread(engine.stop, 30.0))
        assert not running.done()  # the request is mid-way when the drain begins
        await asyncio.sleep(0.01)
        refused: BaseException | None = None
        try:
            await engine.segment(photos["coffee"], options)
        except OverloadedError as exc:
            refused = exc
        result = await running
        await stopping
        return result.labels, refused

    labels, refused = asyncio.run(scenario())
    assert labels.shape == photos["coffee"].shape[:2]
    # Refused while draining ("shutting down") or, on a fast machine, after ("not running").
    assert isinstance(refused, OverloadedError)
    assert "shutting down" in str(refused) or "not running" in str(refused)
    assert not engine.started
    with pytest.raises(OverloadedError, match="not running"):
        asyncio.run(engine.segment(photos["coffee"], options))


def test_stop_past_its_drain_time_fails_the_request_as_overloaded(
    tiny_float_bundle: Bundle, photos: dict[str, np.ndarray]
) -> None:
    engine = Engine(
        tiny_float_bundle,
        EngineConfig(
            max_batch_size=1,
            max_queue_delay_ms=0,
            max_inputs_in_flight=2,
            limits=Limits(
                max_inputs_per_request=4096
            ),  # 2960 windows: still running when stop comes
        ),
    )
    engine.start()
    options = SegmentOptions(scales=(1.0, 1.5), crop=(32, 32), stride=(16, 16))

    async def scenario() -> None:
        running = asyncio.create_task(engine.segment(photos["coffee"], options))
        while engine.queue_depth == 0 and not running.done():
            await asyncio.sleep(0.001)
        await asyncio.to_thread(engine.stop, 0.0)
        with pytest.raises(OverloadedError, match="stopped"):
            await running

    asyncio.run(scenario())


def test_huge_batches_run_without_a_cpu_arena(tiny_bundle: Bundle) -> None:
    """Over RELEASE_PIXELS a CPU run needs no arena shrinkage (the CPU arena is off, so no
    shrink option may be sent: onnxruntime rejects one for a missing arena); results unchanged."""
    runtime = Runtime(
        tiny_bundle.model_path, "pixels", "logits", "uint8", RuntimeSettings(providers=("cpu",))
    )
    side = int(RELEASE_PIXELS**0.5) + 8
    pixels = np.random.default_rng(0).integers(0, 255, (1, 3, side, side), dtype=np.uint8)
    big = runtime.run(pixels)
    corner = runtime.run(np.ascontiguousarray(pixels[:, :, :64, :64]))  # small: no shrinkage
    assert big.shape == (1, 5, (side + 3) // 4, (side + 3) // 4)
    # Away from the crop's edge, the big run's logits equal the small run's.
    np.testing.assert_allclose(big[:, :, :14, :14], corner[:, :, :14, :14], atol=1e-5)
