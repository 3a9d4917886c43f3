"""Admission by bytes: each /segment request holds its body, then its decoded image, then its
plan's estimated peak; over the server-wide limit it is refused (503 while others hold memory,
413 when it could never fit), and what it held is released however it ends."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service import errors
from service.http.admission import ByteAdmission
from tests.unit.test_api import make_client, wait_ready


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_holdings_add_up_and_are_released() -> None:
    admission = ByteAdmission(limit=100)
    with admission.request() as first:
        first.hold(60, "first")
        refused = pytest.raises(
            errors.OverloadedError,
            match="50 bytes and other requests in progress hold 60 bytes of 100 bytes",
        )
        with refused, admission.request() as second:
            second.hold(30, "second")
            second.grow(20, "second")  # 110 > 100: refused, and its 30 released
        assert admission.held == 60
        first.hold(10, "first")  # shrinking is always allowed
        assert admission.held == 10
        never_fits = pytest.raises(errors.PayloadTooLargeError, match="MAX_INFLIGHT_BYTES")
        with never_fits, admission.request() as huge:
            huge.hold(101, "huge")
    assert admission.held == 0


def test_requests_hold_their_plan_and_release_it(
    model_repository: Path, photos: dict[str, np.ndarray]
) -> None:
    body = _png(photos["chelsea"])  # 300x451: about 0.4 MB decoded
    with make_client(model_repository, max_inflight_bytes=len(body) + 100_000) as client:
        wait_ready(client)
        admission = client.app.state.services.admission  # type: ignore[attr-defined]
        # The body fits; the decoded image and the plan's logits do not, even alone: 413.
        answer = client.post("/segment", content=body, headers={"content-type": "image/png"})
        assert answer.status_code == 413, answer.text
        assert "SEGSERVE_MAX_INFLIGHT_BYTES" in answer.json()["message"]
        assert admission.held == 0
        # A declared body over the limit is refused before it is read.
        big = b"\xff\xd8\xff" + bytes(len(body) + 200_000)
        answer = client.post("/segment", content=big, headers={"content-type": "image/jpeg"})
        assert answer.status_code == 413 and "the request body" in answer.json()["message"]
        assert admission.held == 0
    with make_client(model_repository, max_inflight_bytes=64 << 20) as client:
        wait_ready(client)
        admission = client.app.state.services.admission  # type: ignore[attr-defined]
        answer = client.post("/segment", content=body, headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text
        assert admission.held == 0


def test_an_overlay_holds_its_bytes_while_it_renders(
    model_repository: Path, photos: dict[str, np.ndarray]
) -> None:
    """GET overlay.png decodes the stored photo and blends it (~10 bytes a pixel): it takes that
    from the in-flight budget like /segment, so with other requests holding the budget it waits
    (503), and it lets go when done. Four concurrent overlays of a 40 MP photo took 6.7 GB."""
    body = _png(photos["chelsea"])  # 300x451
    with make_client(model_repository, max_inflight_bytes=8 << 20) as client:
        wait_ready(client)
        admission = client.app.state.services.admission  # type: ignore[attr-defined]
        answer = client.post("/segment", content=body, headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text
        overlay = answer.json()["urls"]["overlay"]
        assert client.get(overlay).status_code == 200 and admission.held == 0
        with admission.request() as other:  # another request holds all but 1 MB
            other.hold((8 << 20) - 1_000_000, "another request")
            refused = client.get(overlay)
            assert refused.status_code == 503, refused.text
            assert "rendering this overlay needs" in refused.json()["message"]
        assert admission.held == 0
        assert client.get(overlay).status_code == 200
