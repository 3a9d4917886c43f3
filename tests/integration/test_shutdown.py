"""Graceful shutdown of a real ``python -m service`` under load.

On SIGTERM ``/readyz`` turns 503 at once, new ``/segment`` calls get 503 + Retry-After, the
requests already in flight (and their queued windows) complete with correct results, and the
process exits 0 within the drain timeout. Clients behave like a load balancer's: once refused,
they stop sending to this replica.
"""

from __future__ import annotations

import io
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servers import SegserveServer

DRAIN_TIMEOUT_S = 30.0
# The listener stays up this long after SIGTERM, so the probes below cannot race the exit.
DRAIN_MIN_S = 3.0
# Four passes (2 scales x flip) per request, up to twice the photo: each takes a while.
HEAVY = {"scales": "1,2", "flip": "true", "output": "labels"}


@dataclass
class Outcome:
    sent_at: float
    done_at: float
    status: int | None  # None: the request failed at the transport level
    error: str = ""
    labels: np.ndarray | None = None


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def client_loop(url: str, body: bytes, outcomes: list[Outcome], stop: threading.Event) -> None:
    """Send requests back to back until refused (503 or connection refused) or told to stop."""
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                response = client.post("/segment", params=HEAVY, files={"image": body})
            except httpx.ConnectError:
                outcomes.append(Outcome(sent, time.monotonic(), None, "connect refused"))
                return
            except httpx.HTTPError as exc:
                outcomes.append(Outcome(sent, time.monotonic(), None, repr(exc)))
                return
            labels = None
            if response.status_code == 200:
                labels = cv2.imdecode(
                    np.frombuffer(response.content, np.uint8), cv2.IMREAD_UNCHANGED
                )
            outcomes.append(
                Outcome(sent, time.monotonic(), response.status_code, response.text[:200], labels)
            )
            if response.status_code == 503:
                return


def test_sigterm_under_load_drains_and_exits_zero(
    model_repository: Path, tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    server = SegserveServer(
        model_repository,
        tmp_path / "server.log",
        drain_timeout_s=DRAIN_TIMEOUT_S,
        drain_min_s=DRAIN_MIN_S,
        max_batch_size=2,
        worker_threads=2,
    )
    try:
        server.wait_ready()
        body = png_bytes(photos["astronaut"])
        with httpx.Client(base_url=server.url, timeout=120) as probe:
            expected = probe.post("/segment", params=HEAVY, files={"image": body})
        assert expected.status_code == 200
        reference = cv2.imdecode(np.frombuffer(expected.content, np.uint8), cv2.IMREAD_UNCHANGED)

        outcomes: list[Outcome] = []
        stop = threading.Event()
        clients = [
            threading.Thread(target=client_loop, args=(server.url, body, outcomes, stop))
            for _ in range(4)
        ]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 60
        while sum(o.status == 200 for o in outcomes) < 3:
            assert time.monotonic() < deadline, "load never got going"
            time.sleep(0.05)

        sigterm_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with httpx.Client(base_url=server.url, timeout=10) as probe:
            ready = probe.get("/readyz")
            refused = probe.post("/segment", files={"image": body})
        assert ready.status_code == 503 and ready.json()["draining"] is True
        assert refused.status_code == 503 and refused.json()["error"] == "overloaded"
        assert "shutting down" in refused.json()["message"]
        assert int(refused.headers["retry-after"]) >= 1

        status = server.process.wait(DRAIN_TIMEOUT_S + 15)
        exited_at = time.monotonic()
        assert exited_at - sigterm_at >= DRAIN_MIN_S
        stop.set()
        for thread in clients:
            thread.join(30)
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.terminate()

    log = server.log()
    assert status == 0, log
    assert exited_at - sigterm_at < DRAIN_TIMEOUT_S + 10
    assert "Traceback" not in log, log
    assert "draining" in log

    failed = [o for o in outcomes if o.status not in (200, 503, None)]
    dropped = [o for o in outcomes if o.status is None and o.error != "connect refused"]
    assert not failed, [(o.status, o.error) for o in failed]
    assert not dropped, [o.error for o in dropped]  # no accepted request lost its connection
    drained = [o for o in outcomes if o.status == 200 and o.sent_at < sigterm_at < o.done_at]
    assert drained, "some requests were in flight at SIGTERM and finished during the drain"
    for outcome in (o for o in outcomes if o.status == 200):
        np.testing.assert_array_equal(outcome.labels, reference)
    assert all(
        o.status == 503 for o in outcomes if o.sent_at > sigterm_at + 0.1 and o.status is not None
    )


def test_second_sigterm_stops_at_once_with_143(
    model_repository: Path, tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    """The first SIGTERM drains (up to a minute here); the second ends the process within a second
    although a heavy request is still running (before: up to the drain timeout again)."""
    server = SegserveServer(
        model_repository,
        tmp_path / "server.log",
        drain_timeout_s=60,
        max_batch_size=1,
        worker_threads=1,
        max_input_pixels=16_000_000,  # the 3x pass below is one 10 MP input
    )
    outcomes: list[Outcome] = []
    body = png_bytes(np.tile(photos["astronaut"], (2, 2, 1)))
    heavy = {**HEAVY, "scales": "1,2,3"}
    try:
        server.wait_ready()

        def one_request() -> None:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                sent = time.monotonic()
                try:
                    response = client.post("/segment", params=heavy, files={"image": body})
                    outcomes.append(Outcome(sent, time.monotonic(), response.status_code))
                except httpx.HTTPError as exc:
                    outcomes.append(Outcome(sent, time.monotonic(), None, repr(exc)))

        request = threading.Thread(target=one_request)
        request.start()
        time.sleep(1.0)
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/readyz", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "the first SIGTERM did not start a drain"
            time.sleep(0.05)
        assert server.process.poll() is None and not outcomes  # draining, request in flight
        second_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        status = server.process.wait(30)
        stopped_after = time.monotonic() - second_at
        request.join(30)
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.terminate()
    assert status == 143, server.log()
    assert stopped_after < 2
    assert "second SIGTERM: stopping now" in server.log()
    assert [o.status for o in outcomes] == [None]  # the abandoned request lost its connection


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"require_api_key": "true", "api_key": ""}, "SEGSERVE_REQUIRE_API_KEY is set but"),
        (
            {"max_batch_size": "abc", "max_queue_delay_ms": "-1"},
            "SEGSERVE_MAX_BATCH_SIZE: Input should be a valid integer, unable to parse string as "
            "an integer; SEGSERVE_MAX_QUEUE_DELAY_MS: Input should be greater than or equal to 0",
        ),
    ],
    ids=["required-key-missing", "malformed-values"],
)
def test_unservable_settings_refuse_to_start_in_one_line(
    model_repository: Path, tmp_path: Path, settings: dict[str, str], reason: str
) -> None:
    server = SegserveServer(model_repository, tmp_path / "server.log", **settings)
    try:
        status = server.process.wait(30)
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.terminate()
    assert status == 2
    (line,) = [line for line in server.log().splitlines() if line.strip()]
    assert line.startswith(f"segserve: refusing to start: {reason}"), line
