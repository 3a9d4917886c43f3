"""CUDA graphs (``service/cuda_graphs.py``): the CPU-runnable parts here (batch sizes, padding,
the device copy on the CPU provider, the setting being harmless off CUDA); captured runs against
uncaptured ones under CUDA in the ``gpu`` tests, which skip without a GPU."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import onnxruntime as ort
import pytest

from service.bundle import Bundle
from service.config import EngineConfig, RuntimeSettings
from service.cuda_graphs import DeviceCopy, capture_batch_sizes, pad_batch
from service.engine import Engine
from service.planning import SegmentOptions
from service.runtime import CUDA, Runtime

HAS_CUDA = CUDA in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs onnxruntime's CUDAExecutionProvider and a GPU"
)


def test_capture_batch_sizes_pad_at_most_twofold() -> None:
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(8) == [1, 2, 4, 8]
    assert capture_batch_sizes(6) == [1, 2, 4, 6]
    assert capture_batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    for top in range(1, 40):
        sizes = capture_batch_sizes(top)
        for batch in range(1, top + 1):
            assert min(s for s in sizes if s >= batch) < 2 * batch


def test_pad_batch_appends_zero_items() -> None:
    batch = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2) + 1
    padded = pad_batch(batch, 4)
    assert padded.shape == (4, 3, 2, 2) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:2], batch)
    assert not padded[2:].any()
    assert pad_batch(batch, 2) is batch


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_device_copy_is_a_new_buffer_with_the_same_values(dtype: type[np.floating]) -> None:
    """On the CPU provider: the copy survives the source being overwritten, as a captured
    graph's output buffer is by its next replay."""
    source = np.random.default_rng(0).standard_normal((2, 5, 3, 4)).astype(dtype)
    value = ort.OrtValue.ortvalue_from_numpy(source, "cpu", 0)
    copy = DeviceCopy(np.dtype(dtype), "cpu", ["CPUExecutionProvider"])(value)
    assert copy.data_ptr() != value.data_ptr()
    expected = source.copy()
    source[...] = 0  # the OrtValue wraps this memory
    np.testing.assert_array_equal(copy.numpy(), expected)


def test_cuda_graphs_setting_off_cuda_is_logged_and_harmless(
    tiny_float_bundle: Bundle, photos: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    settings = RuntimeSettings(providers=("cpu",), cuda_graphs=True)
    engine = Engine(tiny_float_bundle, EngineConfig(runtime=settings))
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        engine.start()
    try:
        assert "none captured" in caplog.text
        result = asyncio.run(engine.segment(photos["rocket"], SegmentOptions()))
        assert result.labels.shape == photos["rocket"].shape[:2]
    finally:
        engine.stop()


def cuda_runtime(bundle: Bundle, cuda_graphs: bool) -> Runtime:
    return Runtime(
        bundle.model_path,
        bundle.metadata.input.name,
        bundle.metadata.output.name,
        bundle.metadata.input.dtype,
        RuntimeSettings(providers=("cuda",), allow_cpu_fallback=False, cuda_graphs=cuda_graphs),
    )


@pytest.mark.gpu
@needs_cuda
def test_captured_runs_equal_uncaptured_ones(tiny_bundle: Bundle) -> None:
    """Graphs for batches 1, 2, 4 of 64x64; batches of 1-4 replay (3 padded to 4); another size
    runs uncaptured; a replay does not change an earlier result, on the host or on the device."""
    captured, plain = cuda_runtime(tiny_bundle, True), cuda_runtime(tiny_bundle, False)
    captured.capture_cuda_graphs([(size, 3, 64, 64) for size in (1, 2, 4)])
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 4, 2, 1):
        batch = rng.integers(0, 255, (size, 3, 64, 64), dtype=np.uint8)
        np.testing.assert_allclose(captured.run(batch), plain.run(batch), atol=1e-4)
    other = rng.integers(0, 255, (2, 3, 48, 80), dtype=np.uint8)
    np.testing.assert_allclose(captured.run(other), plain.run(other), atol=1e-4)
    first = rng.integers(0, 255, (2, 3, 64, 64), dtype=np.uint8)
    on_device = captured.run_on_device(first)
    captured.run_on_device(rng.integers(0, 255, (2, 3, 64, 64), dtype=np.uint8))  # replays
    np.testing.assert_allclose(on_device.numpy()[:2], plain.run(first), atol=1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("postprocess", ["host", "device"])
def test_engine_with_cuda_graphs_matches_the_cpu(
    tiny_float_bundle: Bundle, photos: dict[str, np.ndarray], postprocess: str
) -> None:
    """Slide windows at the bundle's crop run captured (batches of 1-4, padded); the labels
    equal the CPU engine's, with post-processing on either side."""
    runtime = RuntimeSettings(providers=("cuda",), allow_cpu_fallback=False, cuda_graphs=True)
    gpu = Engine(
        tiny_float_bundle,
        EngineConfig(max_batch_size=4, postprocess=postprocess, runtime=runtime),  # type: ignore[arg-type]
    )
    cpu = Engine(tiny_float_bundle, EngineConfig(runtime=RuntimeSettings(providers=("cpu",))))
    gpu.start()
    cpu.start()
    try:
        assert gpu.postprocess == postprocess
        for photo in ("coffee", "chelsea", "rocket"):
            options = SegmentOptions(return_probabilities=True)
            on_gpu = asyncio.run(gpu.segment(photos[photo], options))
            on_cpu = asyncio.run(cpu.segment(photos[photo], options))
            assert (on_gpu.labels == on_cpu.labels).mean() >= 0.999
            assert on_gpu.probabilities is not None and on_cpu.probabilities is not None
            np.testing.assert_allclose(on_gpu.probabilities, on_cpu.probabilities, atol=1e-3)
    finally:
        gpu.stop()
        cpu.stop()
