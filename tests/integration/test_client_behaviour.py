"""Slow and vanishing clients against a real ``python -m service`` (tiny bundles): a body that
does not arrive in time is a 408, a client that goes away mid-body or mid-inference is recorded as
499 with one log line and no traceback, and its queued model inputs are dropped."""

from __future__ import annotations

import io
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import SegserveServer, start_server, tcp_sockets


@pytest.fixture(scope="module")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SegserveServer]:
    yield from start_server(
        model_repository,
        tmp_path_factory.mktemp("clients"),
        body_timeout_s=1,
        # Two inputs in flight never fill a batch of 8: each batch waits the 20 ms delay, so a
        # request's windows reach the model at about 100 a second.
        max_batch_size=8,
        max_queue_delay_ms=20,
        max_inputs_in_flight=2,
        answer_timeout_s=2,
    )


def _samples(server: SegserveServer, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def _count(server: SegserveServer, status: str) -> float:
    return sum(
        value
        for labels, value in _samples(server, "segserve_requests_total").items()
        if ("status", status) in labels and ("endpoint", "/segment") in labels
    )


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _headers(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _png(size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _response(client: socket.socket) -> str:
    """One whole HTTP response (headers and a Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += client.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))[15:]
    )
    while len(body) < length:
        body += client.recv(4096)
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_slow_body_is_408(server: SegserveServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(_headers("/segment", 100_000) + b"\x89PNG\r\n\x1a\n")
        started = time.monotonic()
        answer = _response(client)
    assert answer.startswith("HTTP/1.1 408"), answer
    assert '"error":"request_timeout"' in answer and "within 1 s" in answer
    assert 0.9 < time.monotonic() - started < 5


def test_client_gone_mid_body_is_499_in_one_line(server: SegserveServer) -> None:
    before = _count(server, "499")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(_headers("/segment", 100_000) + b"\x89PNG\r\n\x1a\n" + bytes(5000))
        time.sleep(0.2)
    _wait_for(lambda: _count(server, "499") == before + 1)
    log = server.log()
    assert "client closed the connection after" in log
    assert "Traceback" not in log and _count(server, "500") == 0
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


def test_client_gone_mid_inference_drops_its_queued_inputs(server: SegserveServer) -> None:
    """A slide request of 551 windows, about 100 a second: the client leaves once inference has
    begun, and the inputs still queued never reach the model."""
    body = _png((320, 480))
    query = "/segment?model=tiny-float&mode=slide&crop=32&stride=16&scales=1&output=labels"

    def inputs_run() -> float:
        return sum(
            value
            for labels, value in _samples(server, "segserve_batch_size_sum").items()
            if ("model", "tiny-float") in labels
        )

    before_inputs, before = inputs_run(), _count(server, "499")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(_headers(query, len(body)) + body)
        _wait_for(lambda: inputs_run() > before_inputs)  # inference has begun
    _wait_for(lambda: _count(server, "499") == before + 1)
    ran = inputs_run() - before_inputs
    time.sleep(0.5)
    assert inputs_run() - before_inputs - ran <= 2  # at most what was in flight
    assert ran < 200, ran
    assert "client closed the connection before the answer" in server.log()
    assert "Traceback" not in server.log()


def _held(server: SegserveServer) -> float:
    return _samples(server, "segserve_inflight_bytes")[()]


def _owns_connection(server: SegserveServer, client: socket.socket) -> bool:
    """Whether the server process still has the socket of ``client``'s connection open (found
    through /proc: the TCP entry from its port to the client's, and the process's fds)."""
    client_port = client.getsockname()[1]
    inodes = {
        f"socket:[{s.inode}]"
        for s in tcp_sockets()
        if (s.port, s.remote_port) == (server.port, client_port) and s.inode
    }
    fds = Path(f"/proc/{server.process.pid}/fd")
    return any(os.readlink(fd) in inodes for fd in fds.iterdir())


def test_an_answer_not_taken_stays_held_then_is_dropped(server: SegserveServer) -> None:
    """A client that does not read its answer (10 MB of probabilities) keeps it held against
    the in-flight budget, whole while any of it is unsent (the body is in memory until then), and
    is dropped after ``ANSWER_TIMEOUT_S``, which releases it. The answer used to be handed to
    uvicorn whole and its hold released at once; then its hold shrank piece by piece while the
    body stayed allocated; and a dropped client's socket stayed the server's, closing, waiting
    forever to flush the answer's tail."""
    ramp = np.linspace(0, 255, 1000).astype(np.uint8)
    across, down = np.tile(ramp, (1000, 1)), np.tile(ramp[:, None], (1, 1000))
    photo = np.dstack([across, down, 255 - across])
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "PNG")
    body = buffer.getvalue()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", server.port))
    client.sendall(_headers("/segment?output=probabilities", len(body)) + body)

    dropped_before = _count(server, "499")
    client.settimeout(60)
    head = client.recv(4096, socket.MSG_PEEK)  # the answer has started, and is not taken
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    assert length > 5_000_000
    time.sleep(0.5)
    assert _held(server) >= length
    _wait_for(lambda: _held(server) == 0, timeout_s=10)
    _wait_for(lambda: not _owns_connection(server, client), timeout_s=5)
    client.settimeout(10)
    received = b""
    try:
        while chunk := client.recv(1 << 20):  # what the kernel had, then the server's abort
            received += chunk
    except ConnectionResetError:
        pass
    client.close()
    assert len(received) < length  # less than the whole answer
    log = server.log()
    assert "did not take its answer within 2 s" in log
    assert "returned without completing response" not in log
    assert _count(server, "499") == dropped_before + 1  # not the 200 its head said


def test_pipelined_answers_not_taken_are_dropped(server: SegserveServer) -> None:
    """Small answers wait for the socket to drain too: a client that pipelines requests and
    reads nothing kept one of them in progress, with its hold and its request slot, for as long
    as it kept the connection open (64 such clients locked every route but the probes out)."""
    photo = _png((150, 150))
    one = _headers("/segment?output=probabilities", len(photo)) + photo
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", server.port))
    client.setblocking(False)
    for _ in range(60):
        try:
            client.send(one)
        except BlockingIOError:
            break

    _wait_for(lambda: _held(server) > 0, timeout_s=10)
    _wait_for(lambda: _held(server) == 0 and not _owns_connection(server, client), timeout_s=15)
    client.close()
    assert httpx.get(f"{server.url}/models", timeout=5).status_code == 200


@pytest.fixture()
def limited_server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SegserveServer]:
    yield from start_server(
        model_repository, tmp_path_factory.mktemp("limited"), max_connections=2, head_timeout_s=1
    )


def _hold_slot(port: int) -> socket.socket:
    """A connection that has sent a request's headers and no body: a request in progress until
    it is closed (or its body times out)."""
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(_headers("/segment", 100_000) + b"\x89PNG\r\n\x1a\n")
    return client


def test_requests_beyond_the_limit_are_refused_but_probes_served(
    limited_server: SegserveServer,
) -> None:
    """``SEGSERVE_MAX_CONNECTIONS`` requests in progress: with two slow uploads holding both, a
    third request gets the service's JSON 503 with Retry-After, counted by reason, in the
    protocol's body under /v2; the probes are still served (uvicorn's own limit answered them
    503 in plain text, and a liveness probe would have restarted the pod)."""
    url = limited_server.url
    slow = [_hold_slot(limited_server.port) for _ in range(2)]

    def refused() -> bool:
        return httpx.get(f"{url}/models", timeout=5).status_code == 503

    _wait_for(refused)  # both uploads have reached the app
    answer = httpx.get(f"{url}/models", timeout=5)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.json()["error"] == "overloaded"
    assert "SEGSERVE_MAX_CONNECTIONS" in answer.json()["message"]
    v2 = httpx.get(f"{url}/v2/models/tiny", timeout=5)
    assert v2.status_code == 503 and list(v2.json()) == ["error"]
    for probe in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"):
        assert httpx.get(url + probe, timeout=5).status_code == 200, probe
    counted = _samples(limited_server, "segserve_rejected_total")
    assert counted[(("model", ""), ("reason", "connections"))] >= 2
    for client in slow:
        client.close()
    _wait_for(lambda: httpx.get(f"{url}/models", timeout=5).status_code == 200)


def test_connections_that_send_no_request_are_closed(limited_server: SegserveServer) -> None:
    """Silent connections, more than the limit, neither count as requests nor stay: each is
    closed once ``HEAD_TIMEOUT_S`` passes without a request head, as is one trickling its
    headers a byte at a time (one byte stopped uvicorn's keep-alive timer for good)."""
    port = limited_server.port
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(6)]
    trickle = socket.create_connection(("127.0.0.1", port), timeout=5)
    served = httpx.get(f"{limited_server.url}/models", timeout=5)
    assert served.status_code == 200  # six idle connections and two allowed: still served
    started = time.monotonic()
    head = _headers("/segment", 10)
    closed = False
    for byte in head:
        try:
            trickle.sendall(bytes([byte]))
        except OSError:  # reset: the server closed it
            closed = True
            break
        time.sleep(0.2)
        trickle.setblocking(False)
        try:
            closed = trickle.recv(1) == b""
        except BlockingIOError:
            pass
        finally:
            trickle.setblocking(True)
        if closed:
            break
    assert closed and time.monotonic() - started < 5  # 1 s deadline, 73 header bytes at 5/s
    for client in silent:
        assert client.recv(1) == b""  # closed by the server (a timeout here fails the test)
        client.close()
    trickle.close()
