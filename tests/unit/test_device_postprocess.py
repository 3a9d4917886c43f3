"""Post-processing as ONNX graphs (``service/device_postprocess.py``), run here on the CPU provider
through the same IO bindings CUDA uses: against the host path (``service/merging.py``) on random
logits, and through the engine against ``tests/reference.py`` and the host engine, in whole,
slide and TTA modes. Labels must equal the host's except where two classes tie within float
noise."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from service.bundle import Bundle, TestConfig
from service.config import EngineConfig, RuntimeSettings
from service.device_postprocess import DeviceBatch, DevicePostprocess
from service.engine import Engine, SegmentResult
from service.geometry import Window, labels_dtype, window_grid
from service.merging import PassMerge, single_pass_probabilities
from service.planning import PassPlan, SegmentOptions
from service.settings import Settings
from service.ttamap import mean_softmax
from tests.conftest import write_tiny_bundle
from tests.reference import onnx_forward, reference_segment
from tests.unit.test_engine import assert_matches_reference, reference_config, sized

CPU_PROVIDER = [("CPUExecutionProvider", {})]
# Host and device compute the same float32 arithmetic in different orders.
SCORE_ATOL = 1e-5


def postprocess(num_classes: int) -> DevicePostprocess:
    return DevicePostprocess("cpu", CPU_PROVIDER, 1, num_classes, labels_dtype(num_classes))


def device_batch(logits: np.ndarray) -> DeviceBatch:
    return DeviceBatch(ort.OrtValue.ortvalue_from_numpy(logits, "cpu", 0))


def assert_same_labels(
    labels: np.ndarray, expected: np.ndarray, scores: np.ndarray, noise: float = 1e-4
) -> None:
    """Equal wherever the best class leads the runner-up by more than float ``noise``."""
    top2 = np.sort(scores, axis=0)[-2:]
    clear = top2[1] - top2[0] > noise
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], expected[clear])


GEOMETRIES = {
    "slide-overlap": (100, 150, (48, 64), (32, 40), (130, 170)),
    "slide-grid": (96, 128, (48, 64), (48, 64), (70, 90)),  # stride = crop, downsampled
    "whole": (40, 60, None, None, (77, 91)),
}


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=list(GEOMETRIES))
@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flipped"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pass_graphs_equal_the_host_merge(
    geometry: str, flip: bool, dtype: type[np.floating]
) -> None:
    height, width, crop, stride, original = GEOMETRIES[geometry]
    if crop is None or stride is None:
        windows: tuple[Window, ...] = (Window(0, height, 0, width),)
    else:
        windows = tuple(window_grid(height, width, crop, stride))
    plan = PassPlan(height, width, flip, windows)
    rng = np.random.default_rng(len(windows))
    logits = rng.standard_normal((len(windows), 7, 12, 16)).astype(dtype)
    host, device = PassMerge(plan, False), postprocess(7).new_pass(plan)
    batch = device_batch(logits)
    for index in reversed(range(len(windows))):  # arrival order does not matter
        host.add(index, logits[index].astype(np.float32))
        device.add(index, batch[index])
    expected_labels, expected = single_pass_probabilities(host.logits(), plan, original)
    labels, probabilities = postprocess(7).pass_result(device, original, True)
    assert probabilities is not None and labels.dtype == np.uint8
    np.testing.assert_allclose(probabilities, expected, atol=SCORE_ATOL)
    assert_same_labels(labels, expected_labels, expected)
    labels_only, none = postprocess(7).pass_result(device, original, False)
    assert none is None
    np.testing.assert_array_equal(labels_only, labels)


def test_resize_is_torch_bilinear_without_align_corners() -> None:
    """One window of a 1x1-window grid is just the two resizes: compare with F.interpolate."""
    logits = np.random.default_rng(3).standard_normal((1, 4, 5, 7)).astype(np.float32)
    plan = PassPlan(23, 31, False, (Window(0, 23, 0, 31),))
    device = postprocess(4).new_pass(plan)
    device.add(0, device_batch(logits)[0])
    _, probabilities = postprocess(4).pass_result(device, (50, 17), True)
    scores = F.interpolate(torch.from_numpy(logits), size=(23, 31), mode="bilinear")
    scores = F.interpolate(scores, size=(50, 17), mode="bilinear", align_corners=False)
    expected = scores.softmax(dim=1)[0].numpy()
    np.testing.assert_allclose(probabilities, expected, atol=SCORE_ATOL)


def test_tta_mean_and_uint16_labels_equal_the_host() -> None:
    """Three passes (two sizes, one flipped) of 300 classes: mean softmax and uint16 labels."""
    classes, original = 300, (33, 47)
    device_post = postprocess(classes)
    rng = np.random.default_rng(5)
    total = None
    host_passes = []
    plans = [
        PassPlan(20, 30, False, (Window(0, 20, 0, 30),)),
        PassPlan(20, 30, True, (Window(0, 20, 0, 30),)),
        PassPlan(40, 60, False, tuple(window_grid(40, 60, (24, 24), (16, 18)))),
    ]
    for plan in plans:
        logits = rng.standard_normal((len(plan.windows), classes, 6, 6)).astype(np.float32)
        host, device = PassMerge(plan, False), device_post.new_pass(plan)
        batch = device_batch(logits)
        for index in range(len(plan.windows)):
            host.add(index, logits[index])
            device.add(index, batch[index])
        host_passes.append(host.pass_logits())
        total = device_post.add_softmax(total, device, original)
    assert total is not None
    labels, mean = device_post.mean_result(total, len(plans), True)
    host_total = mean_softmax(host_passes, original, np.uint16, probabilities=True).probabilities
    assert host_total is not None
    assert labels.dtype == np.uint16 and mean is not None
    np.testing.assert_allclose(mean, host_total, atol=SCORE_ATOL)
    # 300 classes: probabilities near 1/300, so float noise is ~1e-7
    assert_same_labels(labels, host_total.argmax(axis=0), host_total, noise=1e-6)
    assert labels.max() > 255  # the wide labels are really used


def start(bundle: Bundle, postprocess: str, **config: object) -> Engine:
    engine = Engine(bundle, EngineConfig(postprocess=postprocess, **config))  # type: ignore[arg-type]
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engines(tiny_bundle: Bundle, tiny_float_bundle: Bundle) -> Iterator[dict[str, Engine]]:
    """The two tiny bundles, each post-processed on the host and on the (CPU) device."""
    started = {
        f"{name}-{mode}": start(bundle, mode)
        for name, bundle in (("whole", tiny_bundle), ("slide", tiny_float_bundle))
        for mode in ("host", "device")
    }
    yield started
    for engine in started.values():
        engine.stop()


def segment(engine: Engine, image: np.ndarray, options: SegmentOptions) -> SegmentResult:
    return asyncio.run(engine.segment(image, options))


CASES = {
    "whole": ("whole", SegmentOptions()),
    "whole-probabilities": ("whole", SegmentOptions(return_probabilities=True)),
    "slide": ("slide", SegmentOptions()),
    "slide-probabilities": ("slide", SegmentOptions(return_probabilities=True)),
    "slide-one-window": ("slide", SegmentOptions(crop=(200, 300), stride=(100, 100))),
    "whole-ms-flip": ("whole", SegmentOptions(scales=(0.5, 1.0, 1.5), flip=True)),
    "slide-ms-flip": (
        "slide",
        SegmentOptions(scales=(0.75, 1.0), flip=True, return_probabilities=True),
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_engine_on_the_device_matches_reference_and_host(
    engines: dict[str, Engine], photos: dict[str, np.ndarray], case: str
) -> None:
    bundle_kind, options = CASES[case]
    device, host = engines[f"{bundle_kind}-device"], engines[f"{bundle_kind}-host"]
    assert (device.postprocess, host.postprocess) == ("device", "host")
    image = sized(photos, "chelsea", 150, 225)
    result = assert_matches_reference(device, image, options)
    on_host = segment(host, image, options)
    _, scores = reference_segment(
        onnx_forward(device.bundle),
        image,
        reference_config(device.bundle, options),
        options.scales,
        options.flip,
    )
    assert_same_labels(result.labels, on_host.labels, scores)
    if options.return_probabilities:
        assert result.probabilities is not None and on_host.probabilities is not None
        np.testing.assert_allclose(result.probabilities, on_host.probabilities, atol=SCORE_ATOL)
    assert result.timings["postprocess"] > 0


def test_warm_up_builds_every_session_requests_use(
    engines: dict[str, Engine], photos: dict[str, np.ndarray]
) -> None:
    """No session is built (a graph checked and optimised) inside a request: every case, and an
    input under the graph's minimum side (padded, its logits unpadded on the device)."""
    for kind in ("whole", "slide"):
        engine = engines[f"{kind}-device"]
        assert engine._device_post is not None
        built = set(engine._device_post._sessions)
        for case_kind, options in CASES.values():
            if case_kind == kind:
                segment(engine, sized(photos, "rocket", 70, 50), options)
        segment(engine, sized(photos, "rocket", 12, 200), SegmentOptions(scales=(1.0,)))
        assert set(engine._device_post._sessions) == built


def test_fp16_logits_are_cast_on_the_device(tmp_path: Path, photos: dict[str, np.ndarray]) -> None:
    bundle = write_tiny_bundle(
        tmp_path / "half",
        normalized_in_graph=False,
        fp16_io=True,
        test_config=TestConfig(
            mode="slide", resize_scale=(320, 160), crop=(96, 96), stride=(64, 64)
        ),
    )
    engine = start(bundle, "device")
    try:
        options = SegmentOptions(return_probabilities=True)
        assert_matches_reference(engine, sized(photos, "rocket", 120, 90), options)
    finally:
        engine.stop()


def test_postprocess_setting(monkeypatch: pytest.MonkeyPatch, tiny_bundle: Bundle) -> None:
    """``auto`` is the host on the CPU provider; the setting reaches the engine; bad values fail
    at start-up naming the setting."""
    assert EngineConfig().postprocess == "auto"
    engine = start(tiny_bundle, "auto")
    try:
        assert engine.postprocess == "host"
    finally:
        engine.stop()
    monkeypatch.setenv("SEGSERVE_POSTPROCESS", "device")
    assert Settings().engine_config().postprocess == "device"
    monkeypatch.setenv("SEGSERVE_POSTPROCESS", "gpu")
    with pytest.raises(ValueError, match="postprocess"):
        Settings()


@pytest.mark.gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime's CUDAExecutionProvider and a GPU",
)
def test_under_cuda_auto_is_device_and_matches_the_cpu(
    tiny_float_bundle: Bundle, engines: dict[str, Engine], photos: dict[str, np.ndarray]
) -> None:
    """On CUDA ``auto`` post-processes on the device (graphs on the CUDA provider, logits never
    copied back); every case agrees with the CPU engine's host path."""
    runtime = RuntimeSettings(providers=("cuda",), allow_cpu_fallback=False)
    for bundle_kind, bundle in (
        ("slide", tiny_float_bundle),
        ("whole", engines["whole-host"].bundle),
    ):
        gpu = Engine(bundle, EngineConfig(runtime=runtime))
        gpu.start()
        try:
            assert gpu.postprocess == "device"
            image = sized(photos, "chelsea", 150, 225)
            for kind, options in CASES.values():
                if kind != bundle_kind:
                    continue
                on_gpu = segment(gpu, image, options)
                on_cpu = segment(engines[f"{kind}-host"], image, options)
                assert (on_gpu.labels == on_cpu.labels).mean() >= 0.999
                if options.return_probabilities:
                    assert on_gpu.probabilities is not None and on_cpu.probabilities is not None
                    np.testing.assert_allclose(
                        on_gpu.probabilities, on_cpu.probabilities, atol=1e-3
                    )
        finally:
            gpu.stop()
