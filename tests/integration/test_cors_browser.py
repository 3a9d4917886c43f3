"""Browser origins in a real headless Chromium: a page on a listed origin may call segserve
cross-origin (preflight with ``X-API-Key`` included); the same page reached under another origin
cannot, and segserve refuses the request (403) before it runs a model."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser

from tests.integration.test_page import browser  # noqa: F401  (the Chromium fixture)
from tests.servers import SegserveServer, free_port, start_server

KEY = "cors-test-key"

# Posts an image (sent in as base64) to segserve; resolves to the status and the JSON body's
# error code, or to the browser's own refusal when CORS blocks the answer.
POST = """async ([url, encoded, key]) => {
    const bytes = Uint8Array.from(atob(encoded), c => c.charCodeAt(0));
    const form = new FormData();
    form.append("image", new Blob([bytes], {type: "image/png"}), "p.png");
    const headers = key ? {"X-API-Key": key} : {};
    try {
        const init = {method: "POST", body: form, headers};
        const response = await fetch(url + "/segment?model=tiny", init);
        const body = await response.json();
        return {status: response.status, error: body.error || null, mask: body.mask_id || null};
    } catch (error) {
        return {status: null, error: String(error)};
    }
}"""


@pytest.fixture(scope="module")
def other_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A static page on another port: the origin a browser page calls segserve from."""
    root = tmp_path_factory.mktemp("site")
    (root / "index.html").write_text("<!doctype html><title>another site</title>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield site.server_address[1]
    site.shutdown()


@pytest.fixture(scope="module")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory, other_site: int
) -> Iterator[SegserveServer]:
    yield from start_server(
        model_repository,
        tmp_path_factory.mktemp("cors"),
        api_key=KEY,
        cors_origins=f"http://127.0.0.1:{other_site}",
    )


def refused_origin_count(server: SegserveServer) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    found = re.findall(r'segserve_requests_total\{[^}]*status="403"[^}]*\} (\S+)', text)
    return sum(float(v) for v in found)


def post_from(chromium: Browser, page_url: str, server: SegserveServer, key: str | None) -> Any:
    """Open ``page_url`` in a fresh context and post a small image to segserve from it."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), 90, np.uint8)).save(buffer, format="PNG")
    context = chromium.new_context()
    try:
        tab = context.new_page()
        tab.goto(page_url)
        encoded = base64.b64encode(buffer.getvalue()).decode()
        return tab.evaluate(POST, [server.url, encoded, key])
    finally:
        context.close()


def test_listed_origin_may_call_and_others_are_refused(
    browser: Browser,  # noqa: F811
    server: SegserveServer,
    other_site: int,
) -> None:
    listed = f"http://127.0.0.1:{other_site}/"
    result = post_from(browser, listed, server, KEY)  # preflighted: X-API-Key is not "simple"
    assert result["status"] == 200 and result["mask"], result
    assert post_from(browser, listed, server, None)["status"] == 401  # the key still applies

    before = refused_origin_count(server)
    unlisted = f"http://localhost:{other_site}/"  # same page, another origin
    for key in (KEY, None):
        result = post_from(browser, unlisted, server, key)
        assert result["status"] is None and "Failed to fetch" in result["error"], result
    # Without the key the POST is a "simple" request the browser sends without asking first:
    # segserve answered it with 403 before any route ran.
    assert refused_origin_count(server) > before
