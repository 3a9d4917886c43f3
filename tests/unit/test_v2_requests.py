"""Malformed Open Inference Protocol requests in-process: each is a 4xx with the protocol's
``{"error": ...}`` body naming the problem, never a 500 (tests/integration/test_v2.py drives the
well-formed ones with tritonclient against a real server)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

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
]


@pytest.mark.parametrize(
    ("name", "body", "headers", "status", "message"), CASES, ids=[c[0] for c in CASES]
)
def test_malformed_requests(
    client: TestClient, name: str, body: bytes, headers: dict[str, str], status: int, message: str
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
    element = struct.pack("<I", 50) + b"short"  # a length prefix longer than what follows
    tensor["parameters"] = {"binary_data_size": len(element)}
    body, headers = binary_request({"inputs": [tensor]}, element)
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 400 and "4-byte little-endian length" in response.json()["error"]
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
