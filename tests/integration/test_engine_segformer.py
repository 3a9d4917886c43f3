"""The engine on a real exported SegFormer-B0 (random init, ADE20K's 150 classes and test scale)
against the plain mmseg reference, in each mode."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from service.bundle import Bundle
from service.config import EngineConfig, RuntimeSettings
from service.engine import Engine
from service.geometry import resize_image
from service.planning import SegmentOptions
from tests.reference import ReferenceConfig, onnx_forward, reference_segment


@pytest.fixture(scope="module")
def engine(segformer_b0_bundle: Bundle) -> Iterator[Engine]:
    engine = Engine(segformer_b0_bundle, EngineConfig(runtime=RuntimeSettings(providers=("cpu",))))
    engine.start()
    yield engine
    engine.stop()


@pytest.mark.parametrize(
    ("photo", "size", "options"),
    [
        # Whole at ADE20K's test scale (2048, 512): 300x451 -> 512x770.
        ("chelsea", None, SegmentOptions(return_probabilities=True)),
        # Labels only: the tile-wise path (service.labelmap) on one window.
        ("astronaut", None, SegmentOptions()),
        ("coffee", (200, 300), SegmentOptions(mode="slide", crop=(256, 256), stride=(171, 171))),
        # Several passes: the tile-wise mean softmax (service.ttamap), whole and slide.
        ("rocket", (160, 240), SegmentOptions(scales=(0.5, 1.25), flip=True)),
        (
            "coffee",
            (230, 170),
            SegmentOptions(
                mode="slide", crop=(128, 128), stride=(85, 85), scales=(0.7, 1.15), flip=True
            ),
        ),
    ],
)
def test_segformer_matches_reference(
    engine: Engine,
    photos: dict[str, np.ndarray],
    photo: str,
    size: tuple[int, int] | None,
    options: SegmentOptions,
) -> None:
    image = photos[photo] if size is None else resize_image(photos[photo], size[1], size[0])
    result = asyncio.run(engine.segment(image, options))
    test_config = engine.bundle.metadata.test_config
    labels, scores = reference_segment(
        onnx_forward(engine.bundle),
        image,
        ReferenceConfig(
            mode=options.mode or test_config.mode,
            resize_scale=test_config.resize_scale,
            crop=options.crop or test_config.crop,
            stride=options.stride or test_config.stride,
        ),
        options.scales,
        options.flip,
    )
    assert engine.bundle.metadata.num_classes == 150
    assert result.labels.shape == image.shape[:2] and result.labels.dtype == np.uint8
    assert (result.labels == labels).mean() >= 0.999
    assert len(np.unique(labels)) >= 2
    if options.return_probabilities:
        assert result.probabilities is not None
        shifted = np.exp(scores - scores.max(axis=0))
        np.testing.assert_allclose(result.probabilities, shifted / shifted.sum(axis=0), atol=1e-4)
