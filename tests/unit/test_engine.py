"""The engine against the plain mmseg reference (tests/reference.py) on real photographs.

Every mode (whole, slide, multi-scale + flip) must give the reference's label map on >= 99.9% of
pixels and its logits / probabilities within float noise, through the batched, streamed path.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.batcher import RunStop
from service.bundle import Bundle, TestConfig
from service.config import EngineConfig
from service.engine import Engine, SegmentResult
from service.geometry import resize_image
from service.merging import keep_windows
from service.planning import SegmentOptions
from service.runtime import Runtime
from tests.conftest import write_tiny_bundle
from tests.reference import ReferenceConfig, onnx_forward, reference_segment

AGREEMENT = 0.999
# cv2 and torch compute bilinear coordinates in float32 with different rounding: ~3e-5 apart.
SCORE_ATOL = 2e-4


def start(bundle: Bundle, **config: object) -> Engine:
    engine = Engine(bundle, EngineConfig(**config))  # type: ignore[arg-type]
    engine.start()
    return engine


@pytest.fixture(scope="module")
def whole_engine(tiny_bundle: Bundle) -> Iterator[Engine]:
    engine = start(tiny_bundle)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def slide_engine(tiny_float_bundle: Bundle) -> Iterator[Engine]:
    engine = start(tiny_float_bundle)
    yield engine
    engine.stop()


def segment(engine: Engine, image: np.ndarray, options: SegmentOptions) -> SegmentResult:
    return asyncio.run(engine.segment(image, options))


def reference_config(bundle: Bundle, options: SegmentOptions) -> ReferenceConfig:
    test_config = bundle.metadata.test_config
    return ReferenceConfig(
        mode=options.mode or test_config.mode,
        resize_scale=test_config.resize_scale,
        crop=options.crop or test_config.crop,
        stride=options.stride or test_config.stride,
    )


def assert_matches_reference(
    engine: Engine, image: np.ndarray, options: SegmentOptions
) -> SegmentResult:
    result = segment(engine, image, options)
    labels, scores = reference_segment(
        onnx_forward(engine.bundle, pad_to=engine.bundle.metadata.min_input_side),
        image,
        reference_config(engine.bundle, options),
        options.scales,
        options.flip,
    )
    assert result.labels.shape == image.shape[:2]
    assert result.labels.dtype == np.uint8
    agreement = float((result.labels == labels).mean())
    assert agreement >= AGREEMENT, f"labels agree on {agreement:.5f} of pixels"
    assert len(np.unique(labels)) >= 2  # a constant map would prove nothing
    if options.return_probabilities:
        assert result.probabilities is not None
        assert result.probabilities.shape == scores.shape
        assert result.probabilities.dtype == np.float32
        expected = scores
        if len(engine.plan(options, *image.shape[:2]).passes) == 1:  # single pass: logits
            shifted = np.exp(scores - scores.max(axis=0))
            expected = shifted / shifted.sum(axis=0)
        np.testing.assert_allclose(result.probabilities, expected, atol=SCORE_ATOL)
        np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-4)
    return result


def sized(photos: dict[str, np.ndarray], name: str, height: int, width: int) -> np.ndarray:
    return resize_image(photos[name], width, height)


@pytest.mark.parametrize(
    ("photo", "size"),
    [("astronaut", None), ("chelsea", None), ("coffee", (123, 457)), ("rocket", (61, 45))],
)
@pytest.mark.parametrize("probabilities", [True, False], ids=["probabilities", "labels-only"])
def test_whole_mode_matches_reference(
    whole_engine: Engine,
    photos: dict[str, np.ndarray],
    photo: str,
    size: tuple[int, int] | None,
    probabilities: bool,
) -> None:
    """Labels alone take ``service.labelmap`` with the single window covering the image."""
    image = photos[photo] if size is None else sized(photos, photo, *size)
    result = assert_matches_reference(
        whole_engine, image, SegmentOptions(return_probabilities=probabilities)
    )
    assert result.num_inputs == 1
    assert set(result.timings) == {"preprocess", "queue_wait", "inference", "postprocess"}
    assert all(seconds >= 0 for seconds in result.timings.values())
    assert result.timings["inference"] > 0


@pytest.mark.parametrize(
    ("photo", "size", "crop", "stride"),
    [
        ("coffee", None, None, None),  # bundle default: 96x96 crops, 64x64 stride
        ("chelsea", None, (64, 80), (40, 50)),
        ("rocket", (300, 200), (72, 72), (72, 72)),  # stride == crop: no overlap
        ("astronaut", (90, 130), (400, 200), (300, 100)),  # image smaller than the crop
        ("rocket", (240, 320), (64, 64), (8, 8)),  # windows too many to keep: merged first
    ],
)
@pytest.mark.parametrize("probabilities", [True, False], ids=["probabilities", "labels-only"])
def test_slide_mode_matches_reference(
    slide_engine: Engine,
    photos: dict[str, np.ndarray],
    photo: str,
    size: tuple[int, int] | None,
    crop: tuple[int, int] | None,
    stride: tuple[int, int] | None,
    probabilities: bool,
) -> None:
    """With probabilities the windows are merged into full planes; labels alone take the
    tile-wise path of ``service.labelmap``, from the kept windows or, when they would take more
    memory than the merged buffer, from that buffer."""
    image = photos[photo] if size is None else sized(photos, photo, *size)
    options = SegmentOptions(crop=crop, stride=stride, return_probabilities=probabilities)
    result = assert_matches_reference(slide_engine, image, options)
    plan = slide_engine.plan(options, *image.shape[:2])
    assert result.num_inputs == plan.num_inputs
    stride_out = slide_engine.bundle.metadata.output.stride
    assert keep_windows(plan.passes[0], stride_out) == (stride != (8, 8))
    if crop is None:
        assert result.num_inputs == 8  # coffee 400x600 -> 160x240: 2 x 4 windows


def test_slide_mode_on_uint8_bundle(whole_engine: Engine, photos: dict[str, np.ndarray]) -> None:
    options = SegmentOptions(mode="slide", crop=(96, 128), stride=(64, 96))
    result = assert_matches_reference(whole_engine, photos["chelsea"], options)
    assert result.num_inputs == 6  # chelsea 300x451 -> 160x241: 2 rows x 3 columns


@pytest.mark.parametrize(
    ("engine_name", "size", "scales", "flip", "stride"),
    [
        ("whole_engine", (150, 225), (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True, None),
        ("whole_engine", (150, 225), None, True, None),
        ("whole_engine", (173, 91), (0.6, 1.37), True, None),  # portrait, odd ratios
        ("slide_engine", (150, 225), (0.5, 1.0, 1.25), True, None),
        ("slide_engine", (151, 97), (0.83, 1.9), True, None),  # several windows per pass
        ("slide_engine", (60, 80), (1.0,), True, (4, 4)),  # 32x32 crops: merged buffers
        ("slide_engine", (150, 225), (0.75,), False, None),
    ],
)
@pytest.mark.parametrize("probabilities", [True, False], ids=["probabilities", "labels-only"])
def test_multi_scale_and_flip_match_reference(
    request: pytest.FixtureRequest,
    photos: dict[str, np.ndarray],
    engine_name: str,
    size: tuple[int, int],
    scales: tuple[float, ...] | None,
    flip: bool,
    stride: tuple[int, int] | None,
    probabilities: bool,
) -> None:
    """Several passes take ``service.ttamap`` (tile-wise mean softmax from each pass's logits at
    its own resolution), with kept windows or, for tiny strides, merged buffers."""
    engine: Engine = request.getfixturevalue(engine_name)
    image = sized(photos, "chelsea", *size)
    options = SegmentOptions(
        scales=scales,
        flip=flip,
        crop=None if stride is None else (32, 32),
        stride=stride,
        return_probabilities=probabilities,
    )
    result = assert_matches_reference(engine, image, options)
    plan = engine.plan(options, *size)
    assert result.num_inputs == plan.num_inputs >= len(plan.passes)
    assert len(plan.passes) == len(scales or (1.0,)) * (2 if flip else 1)
    if stride is not None:
        assert not keep_windows(plan.passes[0], engine.bundle.metadata.output.stride)


def test_flip_changes_the_result_for_an_asymmetric_model(
    whole_engine: Engine, photos: dict[str, np.ndarray]
) -> None:
    image = photos["coffee"]
    plain = segment(whole_engine, image, SegmentOptions(return_probabilities=True))
    flipped = segment(whole_engine, image, SegmentOptions(flip=True, return_probabilities=True))
    assert plain.probabilities is not None and flipped.probabilities is not None
    # Averaging with the mirrored pass must change the scores (the stem is not symmetric).
    assert np.abs(plain.probabilities - flipped.probabilities).max() > 1e-3


def test_many_classes_use_uint16_and_wide_resizes(
    tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    bundle = write_tiny_bundle(tmp_path / "wide", num_classes=300)
    engine = start(bundle)
    try:
        image = sized(photos, "astronaut", 64, 80)
        result = segment(engine, image, SegmentOptions(scales=(1.0, 1.5)))
        labels, _ = reference_segment(
            onnx_forward(bundle), image, reference_config(bundle, SegmentOptions()), (1.0, 1.5)
        )
        assert result.labels.dtype == np.uint16
        assert (result.labels == labels).mean() >= AGREEMENT
    finally:
        engine.stop()


def test_keep_ratio_false_resizes_to_the_exact_scale(
    tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    bundle = write_tiny_bundle(
        tmp_path / "exact",
        test_config=TestConfig(mode="whole", resize_scale=(96, 64), keep_ratio=False),
    )
    engine = start(bundle)
    try:
        plan = engine.plan(SegmentOptions(), 300, 451)
        assert (plan.passes[0].height, plan.passes[0].width) == (64, 96)
        result = segment(engine, photos["chelsea"], SegmentOptions())
        assert result.labels.shape == (300, 451)
    finally:
        engine.stop()


@pytest.mark.parametrize(
    ("config", "bound"),
    [
        ({"max_inputs_in_flight": 3, "max_batch_size": 8}, 3),
        # The default bound (2 x batch size, 16) over a queue of 4: each request reserved 16
        # places and was refused "queue is full" on an idle server, forever (concurrency probe).
        ({"max_queue_size": 4, "max_batch_size": 8}, 4),
    ],
)
def test_many_windows_stream_with_bounded_inputs_in_flight(
    tiny_float_bundle: Bundle,
    photos: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    config: dict[str, int],
    bound: int,
) -> None:
    """54 windows, at most ``bound`` queued or running at once, and still the reference's."""
    engine = Engine(tiny_float_bundle, EngineConfig(**config))  # type: ignore[arg-type]
    in_flight: list[int] = []
    running = [0]  # inputs in runs now: parallel runs overlap
    lock = threading.Lock()
    original_run = Runtime.run

    def counting_run(
        runtime: Runtime, batch: np.ndarray, alone: bool = True, stop: RunStop | None = None
    ) -> np.ndarray:
        with lock:
            running[0] += batch.shape[0]
            in_flight.append(engine.queue_depth + running[0])
        try:
            return original_run(runtime, batch, alone, stop)
        finally:
            with lock:
                running[0] -= batch.shape[0]

    monkeypatch.setattr(Runtime, "run", counting_run)
    engine.start()
    try:
        options = SegmentOptions(scales=(1.0,))  # ratio 1 of the photo as loaded: 400x600
        result = assert_matches_reference(engine, photos["coffee"], options)
    finally:
        engine.stop()
    assert result.num_inputs == 54  # 6 rows x 9 columns of 96x96 crops, stride 64
    assert max(in_flight) <= bound and len(in_flight) >= 54 // bound


def test_fp16_contract_is_fed_and_read_as_declared(
    tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    """float16 input normalised here, float16 logits cast back to float32 for merging."""
    bundle = write_tiny_bundle(
        tmp_path / "half",
        normalized_in_graph=False,
        fp16_io=True,
        test_config=TestConfig(
            mode="slide", resize_scale=(320, 160), crop=(96, 96), stride=(64, 64)
        ),
    )
    assert bundle.metadata.input.dtype == "float16" and bundle.metadata.output.dtype == "float16"
    engine = start(bundle)
    try:
        assert_matches_reference(
            engine, photos["chelsea"], SegmentOptions(return_probabilities=True)
        )
        assert_matches_reference(engine, photos["rocket"], SegmentOptions(mode="whole"))
    finally:
        engine.stop()


@pytest.mark.parametrize(
    ("engine_name", "size", "options"),
    [
        ("whole_engine", (12, 200), SegmentOptions(scales=(1.0,))),  # 12 px high: padded to 29
        ("slide_engine", (20, 300), SegmentOptions(scales=(1.0,), return_probabilities=True)),
        ("slide_engine", (64, 80), SegmentOptions(crop=(16, 16), stride=(16, 16))),
        ("whole_engine", (200, 300), SegmentOptions(scales=(0.05, 1.0), flip=True)),  # 10x15
    ],
    ids=["whole-thin", "slide-thin", "slide-tiny-crop", "tiny-scale-flip"],
)
def test_inputs_under_the_minimum_are_padded_like_mmseg(
    request: pytest.FixtureRequest,
    photos: dict[str, np.ndarray],
    engine_name: str,
    size: tuple[int, int],
    options: SegmentOptions,
) -> None:
    """Windows under the graph's 29-px minimum are padded with the mean colour and the padding
    cropped off their logits: the reference pads the same way (mmseg's test-time padding)."""
    engine: Engine = request.getfixturevalue(engine_name)
    assert engine.bundle.metadata.min_input_side == 29
    image = sized(photos, "astronaut", *size)
    assert_matches_reference(engine, image, options)
    # The same with the post-processing as onnxruntime graphs (run here on the CPU provider).
    on_device = start(engine.bundle, postprocess="device")
    try:
        assert on_device._device_post is not None
        assert_matches_reference(on_device, image, options)
    finally:
        on_device.stop()
