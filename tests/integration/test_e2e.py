"""End to end against a real ``python -m service`` process over loopback HTTP.

Real photographs in every output form and mode, each rendering fetched and decoded, the label PNG
checked against the classes the JSON reports (8-bit and 16-bit), concurrent requests batched
together (read from /metrics with prometheus_client's parser), the streaming byte limit on raw
sockets (declared, absent and lying Content-Length), and a full queue answered 503 + Retry-After.
"""

from __future__ import annotations

import contextlib
import io
import select
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.bundle import TestConfig, load_bundle
from tests.conftest import write_tiny_bundle
from tests.servers import SegserveServer, start_server

MAX_UPLOAD = 1_000_000


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny`` (5 classes, whole), ``tiny-slide`` (slide 96/64) and ``tiny300`` (300 classes)."""
    root = tmp_path_factory.mktemp("e2e_repository")
    write_tiny_bundle(root / "tiny")
    write_tiny_bundle(
        root / "tiny-slide",
        test_config=TestConfig(
            mode="slide", resize_scale=(320, 160), crop=(96, 96), stride=(64, 64)
        ),
    )
    write_tiny_bundle(root / "tiny300", num_classes=300)
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SegserveServer]:
    yield from start_server(
        repository,
        tmp_path_factory.mktemp("e2e"),
        max_upload_bytes=MAX_UPLOAD,
        max_batch_size=8,
        max_queue_delay_ms=40,
    )


@pytest.fixture(scope="module")
def http(server: SegserveServer) -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_connections=16)
    with httpx.Client(base_url=server.url, timeout=60, limits=limits) as client:
        yield client


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def decode(payload: bytes) -> np.ndarray:
    array = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)
    assert array is not None
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if array.ndim == 3 else array


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels), via prometheus_client's parser."""
    text = client.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


MODES = [
    ("tiny", {}, "astronaut"),
    ("tiny", {"scales": "0.75,1.25", "flip": "true"}, "coffee"),
    ("tiny-slide", {}, "coffee"),
    (
        "tiny-slide",
        {"mode": "slide", "crop": "128x96", "stride": "100x64", "flip": "true"},
        "rocket",
    ),
    ("tiny-slide", {"mode": "whole"}, "astronaut"),
    ("tiny300", {}, "rocket"),
]


@pytest.mark.parametrize(("model", "params", "photo"), MODES, ids=[f"{m}-{p}" for m, p, _ in MODES])
def test_every_mode_and_rendering(
    http: httpx.Client,
    repository: Path,
    photos: dict[str, np.ndarray],
    model: str,
    params: dict[str, str],
    photo: str,
) -> None:
    image = photos[photo]
    response = http.post(
        "/segment", params={"model": model, **params}, files={"image": ("p.jpg", jpeg_bytes(image))}
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model"] == model and (result["height"], result["width"]) == image.shape[:2]

    meta = load_bundle(repository / model).metadata
    palette = np.asarray(meta.palette, np.uint8)
    labels = decode(http.get(result["urls"]["labels"]).content)
    assert labels.dtype == (np.uint16 if meta.num_classes > 256 else np.uint8)
    assert labels.shape == image.shape[:2]
    ids, counts = np.unique(labels, return_counts=True)
    assert [c["id"] for c in result["classes"]] == ids.tolist()
    assert [c["pixels"] for c in result["classes"]] == counts.tolist()
    assert [c["name"] for c in result["classes"]] == [meta.classes[i] for i in ids]
    assert sum(c["fraction"] for c in result["classes"]) == pytest.approx(1.0)

    colour = decode(http.get(result["urls"]["png"]).content)
    np.testing.assert_array_equal(colour, palette[labels])
    overlay = decode(http.get(result["urls"]["overlay"]).content).astype(float)
    expected = 0.5 * image.astype(float) + 0.5 * palette[labels].astype(float)
    assert np.abs(overlay - expected).mean() < 3.0  # photo went through JPEG twice

    for output in ("png", "labels", "overlay"):
        direct = http.post(
            "/segment",
            params={"model": model, "output": output, **params},
            content=jpeg_bytes(image),
            headers={"content-type": "image/jpeg"},
        )
        assert direct.status_code == 200 and direct.headers["content-type"] == "image/png"
        rendered = decode(direct.content)
        if output == "labels":
            np.testing.assert_array_equal(rendered, labels)
        elif output == "png":
            np.testing.assert_array_equal(rendered, colour)


def test_concurrent_requests_share_batches(
    http: httpx.Client, photos: dict[str, np.ndarray]
) -> None:
    key = ("segserve_batch_size_bucket", (("le", "1.0"), ("model", "tiny")))
    count_key = ("segserve_batch_size_count", (("model", "tiny"),))
    before = scrape(http)
    body = png_bytes(photos["chelsea"])

    def one(_: int) -> int:
        return http.post("/segment", params={"output": "labels"}, files={"image": body}).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(16)))
    assert statuses == [200] * 16
    after = scrape(http)
    batches = after[count_key] - before.get(count_key, 0.0)
    single = after[key] - before.get(key, 0.0)
    assert 0 < batches < 16, "16 concurrent single-input requests should need fewer batches"
    assert single < batches, "at least one batch carried more than one input"
    images = ("segserve_images_total", (("model", "tiny"),))
    assert after[images] - before.get(images, 0.0) == 16


def raw_request(server: SegserveServer, head: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(head.encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                None,
            )
            if length is not None and len(rest) >= length:
                break
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def test_declared_length_over_limit_refused_before_any_body(server: SegserveServer) -> None:
    sock = raw_request(
        server,
        "POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {MAX_UPLOAD * 50}\r\n\r\n",
    )
    with sock:
        status, body = read_response(sock)  # not one body byte was sent
    assert status == 413 and b"payload_too_large" in body


def test_chunked_body_refused_while_streaming(server: SegserveServer) -> None:
    """No Content-Length: the 413 arrives once the limit is crossed, long before the body ends."""
    sock = raw_request(
        server,
        "POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        "Transfer-Encoding: chunked\r\n\r\n",
    )
    chunk = b"\xff" * 65536
    total = MAX_UPLOAD * 64
    sent = 0
    with sock:
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            time.sleep(0.002)
        status, body = read_response(sock)
    assert status == 413 and b"payload_too_large" in body
    # Refused after the limit and long before the end (the bound leaves room for a busy CI box
    # that answers a few megabytes late; a server that buffered everything would read all 64).
    assert MAX_UPLOAD < sent <= MAX_UPLOAD * 16, f"sent {sent} bytes before the refusal"


def test_lying_content_length_never_reads_past_it(
    server: SegserveServer, http: httpx.Client, photos: dict[str, np.ndarray]
) -> None:
    """Content-Length says 1000 and 3 MB follow: the server frames the body at 1000 bytes (an
    invalid image), never buffers the rest, and keeps serving."""
    payload = jpeg_bytes(photos["astronaut"])
    sock = raw_request(
        server,
        "POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        "Content-Length: 1000\r\n\r\n",
    )
    with sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload[:1000] + b"\x00" * 3_000_000)
        status, body = read_response(sock)
    assert status == 400 and b"invalid_image" in body
    assert http.get("/healthz").status_code == 200


@pytest.fixture(scope="module")
def tight_server(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SegserveServer]:
    """A queue of two inputs and batches of one: concurrent requests overflow it."""
    yield from start_server(
        repository, tmp_path_factory.mktemp("tight"), max_queue_size=2, max_batch_size=1
    )


def test_full_queue_is_503_with_retry_after(
    tight_server: SegserveServer, photos: dict[str, np.ndarray]
) -> None:
    body = png_bytes(photos["astronaut"])
    params = {"scales": "1,1.25,1.5,1.75", "output": "labels"}
    with httpx.Client(
        base_url=tight_server.url, timeout=60, limits=httpx.Limits(max_connections=12)
    ) as client:

        def one(_: int) -> httpx.Response:
            return client.post("/segment", params=params, files={"image": body})

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(one, range(12)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 503}, statuses
        for refused in (r for r in responses if r.status_code == 503):
            assert refused.headers["retry-after"] == "1"
            assert (
                refused.json()["error"] == "overloaded"
                and "queue is full" in refused.json()["message"]
            )
        accepted = [decode(r.content) for r in responses if r.status_code == 200]
        for labels in accepted[1:]:
            np.testing.assert_array_equal(labels, accepted[0])  # same photo, same answer
        metrics = scrape(client)
        rejected = ("segserve_rejected_total", (("model", "tiny"), ("reason", "queue_full")))
        assert metrics[rejected] == statuses.count(503)
        assert client.get("/readyz").status_code == 200  # still serving
