"""Who may call what, in-process on the tiny bundles: which routes need the API key (every route
in the OpenAPI schema is called, so a new router cannot silently skip it), the fail-closed key
requirement, and the browser-origin policy (same origin and listed origins pass, others 403)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.http import create_app
from service.settings import Settings
from tests.unit.test_api import make_client, wait_ready

KEY = "k3y-0f-the-day"
# Open on purpose (service/http/auth.py says why); every other route needs the key.
OPEN_ROUTES = {
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/models",
    "/models/{name}",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/openapi.json",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/{name}",
    "/v2/models/{name}/ready",
    "/v2/models/{name}/versions/{version}",
    "/v2/models/{name}/versions/{version}/ready",
}
ALLOWED = "https://app.example"


@pytest.fixture(scope="module")
def keyed(model_repository: Path) -> Iterator[TestClient]:
    with make_client(model_repository, api_key=KEY, cors_origins=(ALLOWED,)) as client:
        wait_ready(client)
        yield client


def png_body(photos: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photos["chelsea"][::4, ::4].copy()).save(buffer, format="PNG")
    return buffer.getvalue()


def routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, path template) of every route the app's OpenAPI schema describes."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(method.upper(), path) for path, item in paths.items() for method in item]


def concrete(path: str) -> str:
    return path.replace("{name}", "tiny").replace("{mask_id}", "A" * 22).replace("{version}", "1")


def test_every_route_but_the_open_ones_needs_the_key(keyed: TestClient) -> None:
    guarded = []
    for method, path in routes(keyed):
        response = keyed.request(method, concrete(path))
        if path in OPEN_ROUTES:
            assert response.status_code == 200, (method, path, response.text)
        else:
            guarded.append(path)
            assert response.status_code == 401, (method, path, response.text)
            if path.startswith("/v2/"):  # the inference protocol's error body
                assert "API key" in response.json()["error"]
            else:
                assert response.json()["error"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("ApiKey")
    assert {
        "/segment",
        "/masks/{mask_id}.png",
        "/masks/{mask_id}/overlay.png",
        "/masks/{mask_id}/rle.json",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    } <= set(guarded)
    for path in ("/", "/static/app.js", "/docs", "/openapi.json"):  # not in the schema
        assert keyed.get(path).status_code == 200, path


def test_key_required_but_missing_refuses_to_build_the_app() -> None:
    for empty in (None, "", "  \n"):
        with pytest.raises(ValueError, match="REQUIRE_API_KEY is set but SEGSERVE_API_KEY"):
            create_app(Settings(require_api_key=True, api_key=empty))
    create_app(Settings(require_api_key=True, api_key=f"{KEY}\n"))  # a key file's newline is fine


def test_key_file_newline_is_not_part_of_the_key() -> None:
    settings = Settings(api_key=f"  {KEY}\n")
    assert settings.api_key is not None and settings.api_key.get_secret_value() == KEY


def test_a_key_no_client_can_send_refuses_to_start() -> None:
    """A header carries ASCII: curl and httpx sent 'ключ-ü' as UTF-8, Starlette read it as
    Latin-1, and every call was a 401; a browser's fetch refused to send it at all."""
    for unsendable in ("ключ-ü", "tab\tinside", "bell\x07"):
        with pytest.raises(ValueError, match="printable ASCII") as refused:
            Settings(api_key=unsendable)
        assert unsendable not in str(refused.value)  # the secret stays out of the log
    settings = Settings(api_key="with space-and_symbols!~")
    assert settings.api_key is not None


def test_cross_origin_requests_are_refused_unless_listed(
    keyed: TestClient, photos: dict[str, np.ndarray]
) -> None:
    body = png_body(photos)
    with_key = {"x-api-key": KEY}
    refused = keyed.post(
        "/segment", files={"image": body}, headers={**with_key, "origin": "https://evil.example"}
    )
    assert refused.status_code == 403, refused.text
    assert refused.json() == {
        "error": "origin_not_allowed",
        "message": "cross-origin request from 'https://evil.example' refused: "
        "SEGSERVE_CORS_ORIGINS does not list it",
    }
    assert "access-control-allow-origin" not in refused.headers
    for origin in ("null", "http://app.example", "https://app.example:8443"):
        assert keyed.get("/models", headers={"origin": origin}).status_code == 403, origin

    listed = keyed.post("/segment", files={"image": body}, headers={**with_key, "origin": ALLOWED})
    assert listed.status_code == 200, listed.text
    assert listed.headers["access-control-allow-origin"] == ALLOWED
    preflight = keyed.options(
        "/segment",
        headers={
            "origin": ALLOWED,
            "access-control-request-method": "POST",
            "access-control-request-headers": "x-api-key",
        },
    )
    assert preflight.status_code == 200
    assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    bad_preflight = keyed.options(
        "/segment",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert bad_preflight.status_code == 403

    # The page posts with its own origin; clients that are not browsers send none.
    same = keyed.post(
        "/segment", files={"image": body}, headers={**with_key, "origin": "http://testserver"}
    )
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
    assert keyed.post("/segment", files={"image": body}, headers=with_key).status_code == 200


def test_no_origins_listed_refuses_every_cross_origin_call(model_repository: Path) -> None:
    with TestClient(create_app(Settings(model_repository=model_repository))) as client:
        response = client.get("/healthz", headers={"origin": ALLOWED})
        assert response.status_code == 403 and response.json()["error"] == "origin_not_allowed"
        assert client.get("/healthz").status_code == 200


def test_cors_origins_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGSERVE_CORS_ORIGINS", "https://a.example/, http://b.example:8080")
    monkeypatch.setenv("SEGSERVE_MASK_STORE_PASSWORD", "r3dis-pass\n")
    settings = Settings()
    assert settings.cors_origins == ("https://a.example", "http://b.example:8080")
    password = settings.mask_store_password
    assert password is not None and password.get_secret_value() == "r3dis-pass"
    assert "r3dis" not in repr(settings)
    for bad in ("*", "https://a.example/app", "a.example"):
        with pytest.raises(ValueError, match="scheme://host"):
            Settings(cors_origins=bad)


def test_stored_masks_are_cached_per_key(keyed: TestClient, photos: dict[str, np.ndarray]) -> None:
    """Browsers cache mask renderings (private, max-age): with a key they must vary on it, or a
    cleared key still shows the masks from the cache."""
    with_key = {"x-api-key": KEY}
    headers = {"content-type": "image/png", **with_key}
    stored = keyed.post("/segment", content=png_body(photos), headers=headers).json()
    for url in stored["urls"].values():
        response = keyed.get(url, headers=with_key)
        assert response.status_code == 200, url
        assert response.headers["cache-control"].startswith("private, max-age=")
        assert {v.strip().lower() for v in response.headers["vary"].split(",")} >= {
            "x-api-key",
            "authorization",
        }, url
