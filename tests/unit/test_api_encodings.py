"""``/segment`` and ``/masks/{id}`` encodings in-process (real engines on the tiny bundles), read
back by their real readers: pycocotools for RLE, scikit-image's rasteriser for the polygons,
``numpy.load`` for the probabilities, against the label PNG and the mmseg reference."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pycocotools import mask as coco_mask

from service.bundle import load_bundle
from service.config import Limits
from service.planning import SegmentOptions, peak_bytes, plan_request, request_bytes
from tests.reference import ReferenceConfig, onnx_forward, reference_segment
from tests.unit.test_api import decode, make_client, post_image, wait_ready
from tests.unit.test_encodings import rasterise

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[TestClient]:
    with make_client(model_repository) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture(scope="module")
def photo(photos: dict[str, np.ndarray]) -> np.ndarray:
    return photos["chelsea"][::2, ::2].copy()  # 150x226


@pytest.fixture(scope="module")
def labels(client: TestClient, photo: np.ndarray) -> np.ndarray:
    response = post_image(client, photo, output="labels")
    assert response.status_code == 200, response.text
    return decode(response.content)


def test_rle_decodes_to_the_label_map(
    client: TestClient, photo: np.ndarray, labels: np.ndarray
) -> None:
    response = post_image(client, photo, output="rle")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["model"], body["height"], body["width"]) == ("tiny", *labels.shape)
    rebuilt = np.full(labels.shape, -1)
    for annotation in body["annotations"]:
        pixels = coco_mask.decode(annotation["segmentation"]).astype(bool)
        assert pixels.sum() == annotation["area"] > 0
        assert (rebuilt[pixels] == -1).all()  # classes do not overlap
        rebuilt[pixels] = annotation["category_id"]
    np.testing.assert_array_equal(rebuilt, labels)
    assert len(body["annotations"]) >= 2


def test_polygons_rasterise_to_the_label_map(
    client: TestClient, photo: np.ndarray, labels: np.ndarray
) -> None:
    """Exact at the default tolerance 0 (tests/unit/test_encodings.py checks IoU >= 0.99 of
    simplified polygons on a smooth map; this tiny random net's map is too fragmented for it)."""
    response = post_image(client, photo, output="polygons")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/geo+json"
    collection = response.json()
    assert collection["type"] == "FeatureCollection" and collection["model"] == "tiny"
    assert [f["id"] for f in collection["features"]] == np.unique(labels).tolist()
    for feature in collection["features"]:
        truth = labels == feature["id"]
        drawn = rasterise(feature["geometry"]["coordinates"], labels.shape)
        np.testing.assert_array_equal(drawn, truth)


def test_stored_mask_offers_the_same_encodings(client: TestClient, photo: np.ndarray) -> None:
    stored = post_image(client, photo).json()
    for output, url in (("rle", stored["urls"]["rle"]), ("polygons", stored["urls"]["polygons"])):
        direct = post_image(client, photo, output=output).json()
        fetched = client.get(url)
        assert fetched.status_code == 200, fetched.text
        assert fetched.json() == direct
    simplified = client.get(stored["urls"]["polygons"], params={"tolerance": 2})
    assert len(simplified.content) < len(client.get(stored["urls"]["polygons"]).content)
    assert client.get(stored["urls"]["polygons"], params={"tolerance": -1}).status_code == 422
    overlay = stored["urls"]["overlay"]
    assert client.get(overlay, params={"opacity": 0.5}).content == client.get(overlay).content
    assert client.get(overlay, params={"opacity": 0}).content != client.get(overlay).content
    assert client.get(overlay, params={"opacity": 1.5}).status_code == 422
    repeated = client.get(overlay, params={"opacity": [0, 1]})
    assert (repeated.status_code, repeated.json()["error"]) == (422, "invalid_parameter")
    assert "given more than once: opacity" in repeated.json()["message"]


def test_probabilities_are_the_reference_tta_softmax(
    client: TestClient, photo: np.ndarray, model_repository: Path
) -> None:
    response = post_image(client, photo, output="probabilities", scales="0.75,1", flip="true")
    assert response.status_code == 200, response.text
    probabilities = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert probabilities.dtype == np.float16 and probabilities.shape == (5, *photo.shape[:2])
    bundle = load_bundle(model_repository / "tiny")
    config = bundle.metadata.test_config
    reference = ReferenceConfig(config.mode, config.resize_scale, config.crop, config.stride)
    _, expected = reference_segment(onnx_forward(bundle), photo, reference, (0.75, 1.0), True)
    np.testing.assert_allclose(probabilities.astype(np.float32), expected, atol=3e-3)
    labels = decode(
        post_image(client, photo, output="labels", scales="0.75,1", flip="true").content
    )
    assert (probabilities.argmax(axis=0) == labels).mean() >= 0.999


def test_single_pass_probabilities_are_the_softmax_of_the_logits(
    client: TestClient, photo: np.ndarray, model_repository: Path
) -> None:
    response = post_image(client, photo, output="probabilities")
    assert response.status_code == 200, response.text
    probabilities = np.load(io.BytesIO(response.content), allow_pickle=False)
    bundle = load_bundle(model_repository / "tiny")
    config = bundle.metadata.test_config
    reference = ReferenceConfig(config.mode, config.resize_scale, config.crop, config.stride)
    _, logits = reference_segment(onnx_forward(bundle), photo, reference)
    expected = torch.from_numpy(logits).softmax(dim=0).numpy()
    np.testing.assert_allclose(probabilities.astype(np.float32), expected, atol=3e-3)


def test_bad_tolerance_is_422(client: TestClient, photo: np.ndarray) -> None:
    for tolerance in ("-1", "1000", "abc"):
        response = post_image(client, photo, output="polygons", tolerance=tolerance)
        assert response.status_code == 422 and "tolerance" in response.json()["message"]


def test_probabilities_over_the_request_budget_are_413(
    model_repository: Path, photo: np.ndarray
) -> None:
    """A budget that fits the labels-only plan but not the probability planes."""
    metadata = load_bundle(model_repository / "tiny").metadata
    height, width = photo.shape[:2]

    def needs(options: SegmentOptions) -> int:
        plan = plan_request(metadata, options, height, width, Limits())
        return peak_bytes(plan, metadata.num_classes, metadata.output.stride)

    labels_only, with_planes = (
        needs(SegmentOptions()),
        needs(SegmentOptions(return_probabilities=True)),
    )
    assert labels_only < with_planes
    with make_client(model_repository, max_request_bytes=(labels_only + with_planes) // 2) as small:
        wait_ready(small)
        assert post_image(small, photo, output="labels").status_code == 200
        refused = post_image(small, photo, output="probabilities")
        assert refused.status_code == 413, refused.text
        assert refused.json()["error"] == "payload_too_large"
        assert "budget" in refused.json()["message"]


def test_rle_and_polygons_over_the_request_budget_are_413(
    model_repository: Path, photo: np.ndarray
) -> None:
    """The plan of output=rle / polygons counts the encoder's memory (``planning.answer_bytes``):
    a budget that fits the labels-only request but not the encoding refuses it before the model
    runs, naming the estimate."""
    metadata = load_bundle(model_repository / "tiny").metadata
    height, width = photo.shape[:2]

    def needs(options: SegmentOptions) -> int:
        plan = plan_request(metadata, options, height, width, Limits())
        return request_bytes(plan, metadata.num_classes, metadata.output.stride)

    labels_only = needs(SegmentOptions())
    rle = needs(SegmentOptions(encoding="rle"))
    polygons = needs(SegmentOptions(encoding="polygons"))
    assert labels_only < rle < polygons
    with make_client(model_repository, max_request_bytes=(labels_only + rle) // 2) as small:
        wait_ready(small)
        assert post_image(small, photo, output="labels").status_code == 200
        for output, estimate in (("rle", rle), ("polygons", polygons)):
            refused = post_image(small, photo, output=output)
            assert refused.status_code == 413, refused.text
            assert f"about {estimate / (1 << 20):.0f} MiB" in refused.json()["message"]
