"""The Open Inference Protocol with Triton's own client (``tritonclient.http``) against a real
server: metadata, readiness, inference with binary and JSON tensors, labels and probabilities
identical to ``/segment``'s, errors as the protocol's body, the API key."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service import __version__
from tests.servers import SegserveServer, start_server


@pytest.fixture(scope="module")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SegserveServer]:
    yield from start_server(model_repository, tmp_path_factory.mktemp("v2"), api_key="v2-key")


# tritonclient adds its own headers to the dict it is given: pass each call a copy.
KEY = {"X-API-Key": "v2-key"}
INFER = "/v2/models/{name}/infer"


@pytest.fixture(scope="module")
def client(server: SegserveServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def photo(photos: dict[str, np.ndarray]) -> np.ndarray:
    return photos["coffee"][::3, ::3].copy()  # 134x200


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def segment(server: SegserveServer, photo: np.ndarray, **params: str) -> bytes:
    response = httpx.post(
        f"{server.url}/segment", params=params, files={"image": png(photo)}, headers=KEY
    )
    assert response.status_code == 200, response.text
    return response.content


def segment_labels(server: SegserveServer, photo: np.ndarray, **params: str) -> np.ndarray:
    content = segment(server, photo, output="labels", **params)
    return cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_UNCHANGED)


def encoded_input(photo: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([png(photo)], dtype=np.object_))
    return tensor


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny-float")
    server = client.get_server_metadata()
    assert server == {
        "name": "segserve",
        "version": __version__,
        "extensions": ["binary_tensor_data"],
    }
    model = client.get_model_metadata("tiny")
    assert model["name"] == "tiny" and model["platform"] == "segserve-bundle"
    assert model["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [1]},
        {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, 3]},
    ]
    assert model["outputs"] == [
        {"name": "labels", "datatype": "UINT8", "shape": [-1, -1]},
        {"name": "probabilities", "datatype": "FP16", "shape": [5, -1, -1]},
    ]
    with pytest.raises(InferenceServerException, match="no model named 'nope'") as failure:
        client.get_model_metadata("nope")
    assert failure.value.status() == "404"
    assert not client.is_model_ready("nope")


def test_infer_binary_labels_equal_segment(
    client: triton.InferenceServerClient, server: SegserveServer, photo: np.ndarray
) -> None:
    result = client.infer(
        "tiny",
        [encoded_input(photo)],
        outputs=[triton.InferRequestedOutput("labels", binary_data=True)],
        request_id="r-1",
        headers=dict(KEY),
    )
    labels = result.as_numpy("labels")
    assert labels.dtype == np.uint8 and labels.shape == photo.shape[:2]
    np.testing.assert_array_equal(labels, segment_labels(server, photo))
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_name"] == "tiny"
    assert response["outputs"][0]["parameters"]["binary_data_size"] == labels.size


def test_infer_pixels_json_and_options(
    client: triton.InferenceServerClient, server: SegserveServer, photo: np.ndarray
) -> None:
    """Decoded pixels as a JSON tensor, slide + TTA options as request parameters."""
    pixels = triton.InferInput("pixels", list(photo.shape), "UINT8")
    pixels.set_data_from_numpy(photo, binary_data=False)
    options = {"mode": "slide", "crop": 96, "stride": "64x48", "scales": "0.75,1", "flip": True}
    result = client.infer(
        "tiny-float",
        [pixels],
        outputs=[triton.InferRequestedOutput("labels", binary_data=False)],
        parameters=options,
        headers=dict(KEY),
    )
    assert "data" in result.get_response()["outputs"][0]
    expected = segment_labels(
        server,
        photo,
        model="tiny-float",
        mode="slide",
        crop="96",
        stride="64x48",
        scales="0.75,1",
        flip="true",
    )
    np.testing.assert_array_equal(result.as_numpy("labels"), expected)


def test_infer_probabilities_equal_segment(
    client: triton.InferenceServerClient, server: SegserveServer, photo: np.ndarray
) -> None:
    """No outputs named: the client asks for every output in binary; labels are what it gets
    unless probabilities are named, as here."""
    result = client.infer(
        "tiny",
        [encoded_input(photo)],
        outputs=[
            triton.InferRequestedOutput("probabilities"),
            triton.InferRequestedOutput("labels"),
        ],
        headers=dict(KEY),
    )
    probabilities = result.as_numpy("probabilities")
    expected = np.load(io.BytesIO(segment(server, photo, output="probabilities")))
    assert probabilities.dtype == np.float16 and probabilities.shape == (5, *photo.shape[:2])
    np.testing.assert_array_equal(probabilities, expected)
    np.testing.assert_array_equal(result.as_numpy("labels"), segment_labels(server, photo))
    default = client.infer("tiny", [encoded_input(photo)], headers=dict(KEY))
    assert [o["name"] for o in default.get_response()["outputs"]] == ["labels"]


@pytest.mark.parametrize(
    ("model", "parameters", "status", "message"),
    [
        ("nope", {}, "404", "no model named 'nope'"),
        ("tiny", {"scales": "0"}, "422", "scales must be positive"),
        ("tiny", {"crop": 64}, "422", "crop and stride apply to slide mode only"),
        ("tiny", {"colour": "red"}, "422", "unknown parameters ['colour']"),
    ],
)
def test_errors_are_the_protocols_body(
    client: triton.InferenceServerClient,
    photo: np.ndarray,
    model: str,
    parameters: dict[str, object],
    status: str,
    message: str,
) -> None:
    with pytest.raises(InferenceServerException) as failure:
        client.infer(model, [encoded_input(photo)], parameters=parameters, headers=dict(KEY))
    assert failure.value.status() == status
    assert message in (failure.value.message() or "")


def test_not_an_image_and_the_api_key(
    client: triton.InferenceServerClient, server: SegserveServer
) -> None:
    garbage = triton.InferInput("image", [1], "BYTES")
    garbage.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as failure:
        client.infer("tiny", [garbage], headers=dict(KEY))
    assert failure.value.status() == "415"
    with pytest.raises(InferenceServerException, match="API key") as failure:
        client.infer("tiny", [garbage])
    assert failure.value.status() == "401"
    raw = httpx.post(f"{server.url}/v2/models/tiny/infer", content=b"{", headers=dict(KEY))
    assert raw.status_code == 400 and set(raw.json()) == {"error"}
    assert raw.json()["error"].startswith("malformed inference request")


def test_infer_is_counted_like_segment(
    client: triton.InferenceServerClient, server: SegserveServer, photo: np.ndarray
) -> None:
    def count(status: str) -> float:
        families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
        requests = next(f for f in families if f.name == "segserve_requests")
        return sum(
            s.value
            for s in requests.samples
            if s.name == "segserve_requests_total"
            and s.labels == {"model": "tiny", "endpoint": INFER, "status": status}
        )

    before, refused = count("200"), count("422")
    client.infer("tiny", [encoded_input(photo)], headers=dict(KEY))
    with pytest.raises(InferenceServerException):
        client.infer("tiny", [encoded_input(photo)], parameters={"scales": "9"}, headers=dict(KEY))
    assert (count("200"), count("422")) == (before + 1, refused + 1)


def test_large_json_outputs_are_refused_before_inference(
    client: triton.InferenceServerClient,
) -> None:
    """5 classes x 1000 x 900 probabilities are 4.5 M numbers: too many as JSON, fine binary."""
    blank = np.zeros((1000, 900, 3), np.uint8)
    with pytest.raises(InferenceServerException) as failure:
        client.infer(
            "tiny",
            [encoded_input(blank)],
            outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)],
            headers=dict(KEY),
        )
    assert failure.value.status() == "413"
    assert "binary data" in (failure.value.message() or "")
    labels = client.infer(
        "tiny",
        [encoded_input(blank)],
        outputs=[triton.InferRequestedOutput("labels", binary_data=False)],
        headers=dict(KEY),
    ).as_numpy("labels")
    assert labels.shape == (1000, 900)


def test_model_version_one_is_the_model(
    client: triton.InferenceServerClient, server: SegserveServer, photo: np.ndarray
) -> None:
    """The metadata lists version "1": the protocol's versioned paths serve it, other versions
    are a 404 naming the one there is."""
    assert client.get_model_metadata("tiny", "1") == client.get_model_metadata("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "2")
    result = client.infer("tiny", [encoded_input(photo)], model_version="1", headers=dict(KEY))
    np.testing.assert_array_equal(result.as_numpy("labels"), segment_labels(server, photo))
    with pytest.raises(InferenceServerException, match="no version '2'") as failure:
        client.infer("tiny", [encoded_input(photo)], model_version="2", headers=dict(KEY))
    assert failure.value.status() == "404"
    with pytest.raises(InferenceServerException, match="no version '2'"):
        client.get_model_metadata("tiny", "2")


def test_statistics_are_not_read_as_a_model_named_stats(
    client: triton.InferenceServerClient,
) -> None:
    for model in ("", "tiny"):
        with pytest.raises(InferenceServerException, match="statistics extension") as failure:
            client.get_inference_statistics(model)
        assert failure.value.status() == "404"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/models/tiny/config", 404),
        ("GET", "/v2/repository/index", 404),
        ("GET", "/v2/models/tiny/infer", 405),
    ],
)
def test_unrouted_v2_paths_answer_the_protocols_body(
    server: SegserveServer, method: str, path: str, status: int
) -> None:
    response = httpx.request(method, server.url + path, headers=KEY)
    assert response.status_code == status
    assert list(response.json()) == ["error"]
    assert path in response.json()["error"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_inflated(
    client: triton.InferenceServerClient,
    server: SegserveServer,
    photo: np.ndarray,
    algorithm: str,
) -> None:
    pixels = triton.InferInput("pixels", list(photo.shape), "UINT8")
    pixels.set_data_from_numpy(photo, binary_data=False)  # JSON compresses: a real saving
    result = client.infer(
        "tiny", [pixels], request_compression_algorithm=algorithm, headers=dict(KEY)
    )
    np.testing.assert_array_equal(result.as_numpy("labels"), segment_labels(server, photo))


@pytest.mark.parametrize(
    ("encoding", "body", "status", "message"),
    [
        ("br", b"{}", 415, "Content-Encoding 'br' is not accepted here"),
        ("gzip", gzip.compress(b" " * (21 * 1024 * 1024)), 413, "inflates past the limit"),
        ("gzip", gzip.compress(b'{"inputs": []}')[:-6], 400, "cut short"),
        ("deflate", b"not deflate", 400, "does not decompress"),
    ],
    ids=["unknown", "bomb", "truncated", "corrupt"],
)
def test_bad_compressed_requests_are_named(
    server: SegserveServer, encoding: str, body: bytes, status: int, message: str
) -> None:
    response = httpx.post(
        f"{server.url}/v2/models/tiny/infer",
        content=body,
        headers={**KEY, "Content-Encoding": encoding},
    )
    assert response.status_code == status
    assert message in response.json()["error"]


def test_segment_refuses_an_encoded_body(server: SegserveServer, photo: np.ndarray) -> None:
    """An image is compressed already: /segment names the encoding instead of failing to
    decode gzip bytes as a picture."""
    response = httpx.post(
        f"{server.url}/segment",
        content=gzip.compress(png(photo)),
        headers={**KEY, "Content-Type": "image/png", "Content-Encoding": "gzip"},
    )
    assert response.status_code == 415
    assert "Content-Encoding 'gzip'" in response.json()["message"]


def test_triton_classification_is_refused_not_ignored(
    client: triton.InferenceServerClient, photo: np.ndarray
) -> None:
    """tritonclient's class_count asks for Triton's classification extension: a 422 saying so,
    not the full label map as if it had not been asked."""
    with pytest.raises(InferenceServerException) as failure:
        client.infer(
            "tiny",
            [encoded_input(photo)],
            outputs=[triton.InferRequestedOutput("labels", class_count=3)],
            headers=dict(KEY),
        )
    assert failure.value.status() == "422"
    assert "classification is not served" in (failure.value.message() or "")


@pytest.mark.parametrize(
    ("tensor", "status", "message"),
    [
        (
            {"parameters": {"binary_data_size": 3}, "data": [1, 2, 3]},
            400,
            "both binary data and JSON data",
        ),
        (
            {"parameters": {"binary_data_size": 3, "colour": "red"}},
            422,
            "input 'pixels': unknown parameters ['colour']",
        ),
    ],
)
def test_input_parameters_not_served_are_refused(
    server: SegserveServer, tensor: dict[str, object], status: int, message: str
) -> None:
    request = {"inputs": [{"name": "pixels", "shape": [1, 1, 3], "datatype": "UINT8", **tensor}]}
    header = json.dumps(request).encode()
    response = httpx.post(
        f"{server.url}/v2/models/tiny/infer",
        content=header + b"\x01\x02\x03",
        headers={**KEY, "Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == status
    assert message in response.json()["error"]
