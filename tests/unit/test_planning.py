"""Planning: slide mode's default window, and the per-request memory estimate against what the
engine really allocates (traced), refused over the budget before anything is allocated."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from models.datasets import DATASETS
from service.bundle import Bundle, TestConfig
from service.config import EngineConfig, Limits
from service.engine import Engine
from service.errors import InvalidParameterError, PayloadTooLargeError
from service.geometry import resize_image
from service.planning import Plan, SegmentOptions, answer_bytes, peak_bytes, plan_request
from tests.conftest import write_tiny_bundle

WINDOWED = TestConfig(mode="whole", resize_scale=None, crop=(96, 96), stride=(64, 64))


@pytest.fixture(scope="module")
def windowed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Whole mode by default, with a slide window for requests that ask for slide mode."""
    return write_tiny_bundle(
        tmp_path_factory.mktemp("windowed") / "w", num_classes=40, test_config=WINDOWED
    )


def _plan(bundle: Bundle, options: SegmentOptions, height: int = 300, width: int = 400) -> Plan:
    return plan_request(bundle.metadata, options, height, width, Limits())


def test_slide_without_crop_takes_the_bundles_window(windowed_bundle: Bundle) -> None:
    plan = _plan(windowed_bundle, SegmentOptions(mode="slide"))
    windows = plan.passes[0].windows
    assert {(w.height, w.width) for w in windows} == {(96, 96)}
    assert sorted({w.y1 for w in windows}) == [0, 64, 128, 192, 204]  # stride 64, last clamped
    assert len(windows) == 5 * 6


def test_a_stride_over_the_crop_runs_where_the_windows_still_cover_the_image(
    windowed_bundle: Bundle,
) -> None:
    """mmseg runs such a grid when no pixel is left uncovered (its ``count_mat`` assertion):
    along an axis at most twice the crop, the first window and the last, clamped to the edge,
    meet. A 97x128 image with crop 64, stride 80: rows [0, 64) and [33, 97), columns [0, 64)
    and [64, 128)."""
    options = SegmentOptions(mode="slide", crop=(64, 64), stride=(80, 80))
    windows = _plan(windowed_bundle, options, 97, 128).passes[0].windows
    assert sorted((w.y1, w.y2, w.x1, w.x2) for w in windows) == [
        (0, 64, 0, 64),
        (0, 64, 64, 128),
        (33, 97, 0, 64),
        (33, 97, 64, 128),
    ]
    # One more column and the second window starts at 80: columns 64..66 are in no window.
    with pytest.raises(
        InvalidParameterError, match=r"leaves pixels 64\.\.66 uncovered along the width"
    ):
        _plan(windowed_bundle, options, 97, 130)
    # Each pass is checked at its own size: the 1.5x pass of a covered image is not covered.
    scaled = SegmentOptions(mode="slide", crop=(64, 64), stride=(80, 80), scales=(1.0, 1.5))
    with pytest.raises(InvalidParameterError, match="of a 192x146 pass"):
        _plan(windowed_bundle, scaled, 97, 128)


def test_a_crop_without_stride_gets_the_bundle_stride_capped_at_the_crop(
    windowed_bundle: Bundle, tiny_bundle: Bundle
) -> None:
    small = _plan(windowed_bundle, SegmentOptions(mode="slide", crop=(48, 48)))
    assert sorted({w.x1 for w in small.passes[0].windows})[:3] == [0, 48, 96]
    # No window in the bundle: two thirds of the crop, mmseg's usual overlap (512 -> 341).
    plan = _plan(tiny_bundle, SegmentOptions(mode="slide", crop=(90, 60)))
    assert sorted({w.y1 for w in plan.passes[0].windows})[:2] == [0, 60]
    assert sorted({w.x1 for w in plan.passes[0].windows})[:2] == [0, 40]


def test_slide_without_any_window_names_what_to_pass(tiny_bundle: Bundle) -> None:
    assert tiny_bundle.metadata.test_config.crop is None
    with pytest.raises(InvalidParameterError, match=r"no default one.*pass crop=HxW"):
        _plan(tiny_bundle, SegmentOptions(mode="slide"))


@pytest.mark.parametrize("dataset", ["ade20k", "coco-stuff"])
def test_whole_mode_datasets_carry_their_training_crop(dataset: str) -> None:
    config = TestConfig.model_validate(DATASETS[dataset].test_config)
    assert config.mode == "whole"
    assert (config.crop, config.stride) == ((512, 512), (341, 341))


@pytest.fixture(scope="module")
def engine(windowed_bundle: Bundle) -> Iterator[Engine]:
    engine = Engine(windowed_bundle, EngineConfig())
    engine.start()
    yield engine
    engine.stop()


@pytest.mark.parametrize(
    "options",
    [
        SegmentOptions(mode="slide"),  # labels only: kept windows
        SegmentOptions(mode="slide", stride=(16, 16)),  # labels only: merged at the resized size
        SegmentOptions(return_probabilities=True),  # planes at the original size
        SegmentOptions(flip=True, return_probabilities=True),  # two passes and the mean
        SegmentOptions(mode="slide", scales=(0.5, 1.0, 1.5), flip=True),  # six passes' windows
        SegmentOptions(mode="slide", scales=(0.5, 1.0), flip=True, return_probabilities=True),
    ],
    ids=["kept", "merged", "probabilities", "flip", "scales-flip", "slide-scales-flip"],
)
def test_estimate_follows_what_the_engine_allocates(
    engine: Engine, photos: dict[str, np.ndarray], options: SegmentOptions
) -> None:
    """NumPy's allocations while a request runs (traced in every thread) against the plan's
    estimate; onnxruntime's own arena is not traced and not estimated. Its output arrays are not
    traced either, so the labels-only passes here keep windows (copied into a traced stack)
    rather than a whole image's raw output."""
    image = resize_image(photos["astronaut"], 400, 300)
    plan = engine.plan(options, *image.shape[:2])
    estimate = peak_bytes(plan, engine.bundle.metadata.num_classes, 4)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        asyncio.run(engine.run(image, plan))
        measured = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    # The decoded image is estimated but was allocated before tracing began.
    measured += image.nbytes
    assert 0.8 * estimate <= measured <= 1.25 * estimate, f"{measured=} {estimate=}"


def test_over_budget_is_refused_before_allocating(windowed_bundle: Bundle) -> None:
    """A 12 MP photo with flip on a 150-class model: its labels stream tile by tile, its
    probabilities alone would be 7 GB."""
    budget = 2 << 30
    limits = Limits(max_request_bytes=budget, max_input_pixels=12_000_000)
    ade = windowed_bundle.metadata.model_copy(
        update={"classes": ("c",) * 150, "palette": ((0, 0, 0),) * 150}
    )
    flip = SegmentOptions(flip=True, return_probabilities=True)
    # 7.2 GB of float32 planes to compute them, 7.2 GB more to send them as float16 (and the copy)
    with pytest.raises(PayloadTooLargeError, match=r"about 14\d{3} MiB.*budget of 2048 MiB"):
        plan_request(ade, flip, 3000, 4000, limits)
    for options in (SegmentOptions(), SegmentOptions(flip=True)):  # logits only
        assert peak_bytes(plan_request(ade, options, 3000, 4000, limits), 150, 4) < budget
    small = plan_request(ade, flip, 300, 400, limits)
    assert peak_bytes(small, 150, 4) < budget
    with pytest.raises(PayloadTooLargeError, match="budget of 1 MiB"):
        plan_request(ade, SegmentOptions(), 300, 400, Limits(max_request_bytes=1 << 20))


def test_limits_default_is_written_once() -> None:
    from service.settings import Settings

    assert Settings().max_request_bytes == Limits().max_request_bytes == 2 << 30


def test_a_model_input_over_its_pixel_limit_is_refused_by_name(windowed_bundle: Bundle) -> None:
    """A 12 MP photo at scale 1 in whole mode is one 12 MP model input: onnxruntime's working
    memory for it (~470 bytes a pixel for B0, 5.6 GB) is not in the request's estimate, so such
    inputs are refused, and slide mode (windows under the limit) serves the photo."""
    whole = SegmentOptions(mode="whole", scales=(1.0,))
    with pytest.raises(
        InvalidParameterError,
        match=r"whole mode would run the model on a 4000x3000 input.*mode=slide",
    ):
        plan_request(windowed_bundle.metadata, whole, 3000, 4000, Limits())
    assert plan_request(windowed_bundle.metadata, whole, 2048, 2048, Limits()).passes
    slide = SegmentOptions(mode="slide", crop=(1024, 1024), stride=(1024, 1024))
    assert (
        len(plan_request(windowed_bundle.metadata, slide, 3000, 4000, Limits()).passes[0].windows)
        == 12
    )
    big_windows = SegmentOptions(mode="slide", crop=(2048, 2048))
    with pytest.raises(InvalidParameterError, match=r"2048x2048 input.*use a smaller crop"):
        plan_request(
            windowed_bundle.metadata, big_windows, 3000, 4000, Limits(max_input_pixels=1 << 20)
        )


def test_a_probabilities_answer_is_held_with_its_encoding(windowed_bundle: Bundle) -> None:
    """float16 (C, H, W) probabilities and the socket buffer's copy of them: 4 bytes a class and
    pixel on top of the plan (a 620x620 request took 590 MB against 220 MiB held before)."""
    metadata = windowed_bundle.metadata
    plain = plan_request(metadata, SegmentOptions(), 620, 620, Limits())
    probabilities = plan_request(
        metadata, SegmentOptions(return_probabilities=True), 620, 620, Limits()
    )
    assert answer_bytes(plain, metadata.num_classes) == 0
    assert answer_bytes(probabilities, metadata.num_classes) == 4 * metadata.num_classes * 620 * 620


def test_rle_and_polygon_answers_are_held_with_their_encoder(windowed_bundle: Bundle) -> None:
    """output=rle / polygons: the encoder's measured working memory (``encoding_bytes``, one
    source with GET /masks/{id}/...), polygons for the most corners the map may have. Nothing
    was held before, and an RLE of a noisy 36 MP map took 1.26 GB over its labels."""
    metadata = windowed_bundle.metadata
    rle, polygons = (
        plan_request(metadata, SegmentOptions(encoding=encoding), 620, 620, Limits())
        for encoding in ("rle", "polygons")
    )
    assert answer_bytes(rle, metadata.num_classes) == 12 * 620 * 620 + (16 << 20)
    assert answer_bytes(polygons, metadata.num_classes) == 24 * 620 * 620 + 600 * 385_641
    assert answer_bytes(rle, 300) == 24 * 620 * 620 + (16 << 20)  # 16-bit labels


def test_a_strip_the_test_resize_empties_is_refused_with_what_to_ask(tmp_path: Path) -> None:
    """ADE20K's keep-ratio resize to (2048, 512) takes a 5000x1 strip to 2048x0 (mmseg cannot run
    it either): the refusal names the resize and the option that runs the strip, not "a scale",
    which the request never gave."""
    ade = write_tiny_bundle(
        tmp_path / "ade",
        test_config=TestConfig(mode="whole", resize_scale=(2048, 512)),
    )
    with pytest.raises(
        InvalidParameterError,
        match=r"test resize to \(2048, 512\).*makes the 5000x1 image 2048x0: ask for scales=1",
    ):
        plan_request(ade.metadata, SegmentOptions(), 1, 5000, Limits())
    assert plan_request(ade.metadata, SegmentOptions(scales=(1.0,)), 1, 5000, Limits()).passes
    with pytest.raises(InvalidParameterError, match=r"a scale makes the 5000x1 image 0x0, empty"):
        plan_request(ade.metadata, SegmentOptions(scales=(0.25,)), 1, 5000, Limits())
