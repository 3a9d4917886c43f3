"""Malformed Open Inference Protocol requests in-process: each is a 4xx with the protocol's
``{"error": ...}`` body naming the problem, never a 500 (tests/integration/test_v2.py drives the
well-formed ones with tritonclient against a real server)."""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.errors import MalformedRequestError
from service.http.v2 import MAX_JSON_REQUEST_BYTES, _header_length
from tests.unit.test_api import make_client, wait_ready

INFER = "/v2/models/tiny/infer"


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[TestClient]:
    with make_client(model_repository) as test_client:
        wait_ready(test_client)
        yield test_client


def binary_request(header: dict, blob: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + blob, {"Inference-Header-Content-Length": str(len(text))}


def pixels(shape: list[int], data: list | None, **extra: object) -> dict:
    return {
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": shape, "data": data}],
        **extra,
    }


CASES = [
    ("not json", b"{", {}, 400, "malformed inference request"),
    ("no inputs field", b"{}", {}, 400, "inputs"),
    ("unknown field", json.dumps({"inputs": [], "extra": 1}).encode(), {}, 400, "extra"),
    (
        "two inputs",
        json.dumps({"inputs": [pixels([1, 1, 3], [0, 0, 0])["inputs"][0]] * 2}).encode(),
        {},
        422,
        "exactly one input",
    ),
    (
        "unknown input",
        json.dumps(
            {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [0]}]}
        ).encode(),
        {},
        422,
        "unknown input 'x'",
    ),
    (
        "pixels not HxWx3",
        json.dumps(pixels([2, 2], [0, 0, 0, 0])).encode(),
        {},
        422,
        "[height, width, 3]",
    ),
    ("pixels count", json.dumps(pixels([1, 2, 3], [0, 0, 0])).encode(), {}, 422, "6 integers"),
    ("pixels range", json.dumps(pixels([1, 1, 3], [0, 0, 300])).encode(), {}, 422, "0..255"),
    ("pixels floats", json.dumps(pixels([1, 1, 3], [0.5, 0, 0])).encode(), {}, 422, "integers"),
    (  # -1 x -1 is "one element" to math.prod: it was taken as the encoded image
        "bytes with negative dims",
        json.dumps(
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1, -1], "data": ["a"]}]}
        ).encode(),
        {},
        422,
        "one BYTES element",
    ),
    (
        "bytes as json",
        json.dumps(
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["abc"]}]}
        ).encode(),
        {},
        422,
        "binary data",
    ),
    (
        "unknown output",
        json.dumps(pixels([1, 1, 3], [0, 0, 0], outputs=[{"name": "logits"}])).encode(),
        {},
        422,
        "unknown outputs ['logits']",
    ),
    (
        "bad mode",
        json.dumps(pixels([1, 1, 3], [0, 0, 0], parameters={"mode": "tiles"})).encode(),
        {},
        422,
        "mode must be",
    ),
    (
        "flip not bool",
        json.dumps(pixels([1, 1, 3], [0, 0, 0], parameters={"flip": "yes"})).encode(),
        {},
        422,
        "flip must be a boolean",
    ),
    (
        "header length past body",
        b"{}",
        {"Inference-Header-Content-Length": "99"},
        400,
        "for a body of 2 bytes",
    ),
    # Nested lists of uneven lengths: numpy refused to make an array of them, a 500.
    (
        "pixels ragged",
        json.dumps(pixels([1, 2, 3], [[0, 0, 0], [9, 9]])).encode(),
        {},
        422,
        "6 integers",
    ),
    (
        "binary output flag as text",  # "false" is a true string: binary data came back
        json.dumps(
            pixels([1, 1, 3], [0, 0, 0], parameters={"binary_data_output": "false"})
        ).encode(),
        {},
        422,
        "'binary_data_output' must be true or false, got 'false'",
    ),
    (
        "output binary flag as text",
        json.dumps(
            pixels(
                [1, 1, 3],
                [0, 0, 0],
                outputs=[{"name": "labels", "parameters": {"binary_data": "no"}}],
            )
        ).encode(),
        {},
        422,
        "'binary_data' must be true or false, got 'no'",
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "headers", "status", "message"), CASES, ids=[c[0] for c in CASES]
)
def test_malformed_requests(
    client: TestClient,
    name: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    message: str,
) -> None:
    response = client.post(
        INFER, content=body, headers={"content-type": "application/json", **headers}
    )
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    assert message in response.json()["error"]


def test_binary_sizes_must_add_up(client: TestClient) -> None:
    tensor = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [1],
        "parameters": {"binary_data_size": 10},
    }
    body, headers = binary_request({"inputs": [tensor]}, b"x" * 7)
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 400 and "binary_data_size is 10" in response.json()["error"]
    # A length prefix longer than what follows; fewer bytes than a prefix (was "empty image").
    for element in (struct.pack("<I", 50) + b"short", b"abc"):
        tensor["parameters"] = {"binary_data_size": len(element)}
        body, headers = binary_request({"inputs": [tensor]}, element)
        response = client.post(INFER, content=body, headers=headers)
        assert response.status_code == 400
        assert "4-byte little-endian length" in response.json()["error"]
    raw = {
        "name": "pixels",
        "datatype": "UINT8",
        "shape": [2, 2, 3],
        "parameters": {"binary_data_size": 5},
    }
    body, headers = binary_request({"inputs": [raw]}, b"\0" * 5)
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 400 and "5 binary bytes" in response.json()["error"]


def test_binary_pixels_answer_binary_labels(client: TestClient) -> None:
    raw = {
        "name": "pixels",
        "datatype": "UINT8",
        "shape": [2, 3, 3],
        "parameters": {"binary_data_size": 18},
    }
    body, headers = binary_request(
        {"inputs": [raw], "parameters": {"binary_data_output": True}}, bytes(range(18))
    )
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    (output,) = header["outputs"]
    assert output == {
        "name": "labels",
        "shape": [2, 3],
        "datatype": "UINT8",
        "parameters": {"binary_data_size": 6},
    }
    assert len(response.content) == length + 6


def test_a_json_part_over_its_limit_is_refused_before_parsing(model_repository: Path) -> None:
    """Pixels as JSON numbers take 16 bytes each once parsed (a 19 MB body took 540 MB): a JSON
    part over ``MAX_JSON_REQUEST_BYTES`` is a 413 naming the binary extension, before parsing."""
    with make_client(model_repository, max_upload_bytes=8 << 20) as client:
        wait_ready(client)
        _json_part_limit(client)


def _json_part_limit(client: TestClient) -> None:
    side = 900
    values = ",".join(["7"] * (side * side * 3))
    tensor = f'{{"name":"pixels","datatype":"UINT8","shape":[{side},{side},3],"data":[{values}]}}'
    body = f'{{"inputs":[{tensor}]}}'.encode()
    assert len(body) > MAX_JSON_REQUEST_BYTES
    response = client.post(INFER, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert "send the image as binary data" in response.json()["error"]
    # Under the limit the same kind of request is served.
    small = json.dumps(pixels([40, 50, 3], [7] * 6000)).encode()
    response = client.post(INFER, content=small, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [40, 50]


def test_a_header_length_of_non_ascii_digits_is_malformed() -> None:
    """A raw 0xB2 header byte reaches the app as "²" (Latin-1), which ``str.isdigit`` takes and
    ``int`` refuses: that was a 500. (The test client re-encodes header bytes, so the function
    is called directly.)"""
    with pytest.raises(MalformedRequestError, match="'²' for a body of 2 bytes"):
        _header_length("²", 2)
    assert _header_length("2", 2) == 2 and _header_length(None, 7) == 7


def test_decompression_is_held_before_it_runs(model_repository: Path) -> None:
    """A compressed body is held at what it can inflate to (deflate's 1032:1, capped by the
    upload limit) before it inflates: a 2 KB gzip of zeros inflated to the upload limit (2 MB
    here) outside the budget, then was refused for its size. A small one still fits."""
    bomb = gzip.compress(bytes(2 * 1024 * 1024))
    with make_client(model_repository, max_inflight_bytes=1 << 20) as budgeted:
        wait_ready(budgeted)
        admission = budgeted.app.state.services.admission  # type: ignore[attr-defined]
        headers = {"content-type": "application/json", "content-encoding": "gzip"}
        refused = budgeted.post("/v2/models/tiny/infer", content=bomb, headers=headers)
        assert refused.status_code == 413
        assert refused.json()["error"].startswith("decompressing the request body needs")
        request = pixels([1, 2, 3], [0, 0, 0, 255, 255, 255])
        small = gzip.compress(json.dumps(request).encode())
        answer = budgeted.post("/v2/models/tiny/infer", content=small, headers=headers)
        assert answer.status_code == 200, answer.text
        assert admission.held == 0
