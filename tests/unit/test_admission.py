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
from service.encodings import encoding_bytes, polygon_corners
from service.http.admission import ByteAdmission
from tests.unit.test_api import decode, make_client, wait_ready

MIB = 1 << 20


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


def test_a_multipart_form_holds_its_parsing(
    model_repository: Path, photos: dict[str, np.ndarray]
) -> None:
    """Parsing a form takes three times its body (the parser's copy, then the image read out of
    it), where the body alone was held: within a budget of twice the body, the form is refused
    while it parses, and the same image as a raw body passes that stage."""
    body = _png(photos["chelsea"])
    with make_client(model_repository, max_inflight_bytes=2 * len(body) + 50_000) as client:
        wait_ready(client)
        admission = client.app.state.services.admission  # type: ignore[attr-defined]
        form = client.post("/segment", files={"image": ("c.png", body)})
        assert form.status_code == 413, form.text
        assert form.json()["message"].startswith("parsing the multipart form needs")
        raw = client.post("/segment", content=body, headers={"content-type": "image/png"})
        assert "multipart" not in raw.json()["message"]  # refused later: the decoded image
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


def test_rle_and_polygons_hold_their_encoding_while_it_runs(
    model_repository: Path, photos: dict[str, np.ndarray]
) -> None:
    """GET rle.json and polygons.geojson hold their encoder's measured memory
    (``encodings.encoding_bytes``) like overlays: 413 naming the budget when it could never fit,
    503 while others hold it, released when done. Four concurrent RLE encodings of a 29 MP noisy
    map grew the process by 2.4 GB while holding nothing."""
    body = _png(photos["chelsea"])  # 300x451 labels, 8-bit
    rle_needs = encoding_bytes("rle", 300, 451, 1)
    assert rle_needs == 12 * 300 * 451 + (16 << 20)
    with make_client(model_repository, max_inflight_bytes=8 << 20) as client:
        wait_ready(client)
        admission = client.app.state.services.admission  # type: ignore[attr-defined]
        answer = client.post("/segment", content=body, headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text
        refused = client.get(answer.json()["urls"]["rle"])
        assert refused.status_code == 413, refused.text
        assert refused.json()["message"] == (
            f"encoding this mask as RLE needs {rle_needs / MIB:.0f} MiB, more than the 8 MiB all "
            "requests in progress may hold (SEGSERVE_MAX_INFLIGHT_BYTES)"
        )
        assert admission.held == 0
    budget = 64 << 20
    with make_client(model_repository, max_inflight_bytes=budget) as client:
        wait_ready(client)
        admission = client.app.state.services.admission  # type: ignore[attr-defined]
        urls = client.post("/segment", content=body, headers={"content-type": "image/png"}).json()[
            "urls"
        ]
        corners = polygon_corners(decode(client.get(urls["labels"]).content))
        polygons_needs = encoding_bytes("polygons", 300, 451, 1, corners)
        assert 24 * 300 * 451 < polygons_needs < budget
        for url, what, needs in (
            (urls["rle"], "RLE", rle_needs),
            (urls["polygons"], "polygons", polygons_needs),
        ):
            with admission.request() as other:  # another request leaves 1 byte too few
                other.hold(budget - needs + 1, "another request")
                refused = client.get(url)
                assert refused.status_code == 503, refused.text
                message = refused.json()["message"]
                assert message.startswith(
                    f"encoding this mask as {what} needs {needs / MIB:.0f} MiB and other "
                    "requests in progress hold"
                ), message
                assert refused.headers["retry-after"] == "1"
            assert admission.held == 0
            assert client.get(url).status_code == 200
            assert admission.held == 0
