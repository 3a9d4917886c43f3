"""Configuration of the HTTP service: ``SEGSERVE_*`` parsing, per-model engine overrides, and what
clients see when the configured mask store is down."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from service.config import EngineConfig
from service.http import create_app
from service.settings import Settings
from tests.servers import free_port


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGSERVE_MODEL_REPOSITORY", "/models")
    monkeypatch.setenv("SEGSERVE_PROVIDERS", " CPU ")
    monkeypatch.setenv("SEGSERVE_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("SEGSERVE_API_KEY", "Zq9-secret")
    monkeypatch.setenv("SEGSERVE_MASK_STORE", "redis://cache:6379/0")
    monkeypatch.setenv("SEGSERVE_PER_MODEL", '{"b5": {"max_batch_size": 1}}')
    settings = Settings()
    assert settings.model_repository == Path("/models")
    assert settings.providers == ("cpu",)
    assert settings.max_batch_size == 3
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "Zq9-secret"
    assert "Zq9" not in repr(settings)  # the key never shows in logs
    assert settings.mask_store == "redis://cache:6379/0"
    assert settings.per_model == {"b5": {"max_batch_size": 1}}
    config = settings.engine_config()
    assert config.runtime.providers == ("cpu",) and config.max_batch_size == 3
    assert settings.engine_config("b5").max_batch_size == 1


def test_defaults_and_empty_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SEGSERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SEGSERVE_API_KEY", "")
    settings = Settings()
    assert settings.api_key is None
    assert settings.providers == ("cuda", "cpu") and settings.mask_store == "memory"
    assert settings.model_repository == Path("model_repository")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SEGSERVE_PROVIDERS", "tpu"),
        ("SEGSERVE_PROVIDERS", ""),
        ("SEGSERVE_MAX_BATCH_SIZE", "0"),
        ("SEGSERVE_INFERENCE_TIMEOUT_S", "-1"),
        ("SEGSERVE_MAX_UPLOAD_BYTES", "lots"),
    ],
)
def test_invalid_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_per_model_overrides_apply_on_top_of_the_global_config() -> None:
    settings = Settings(
        max_batch_size=8,
        max_crop=4096,
        per_model={"tiny": {"max_batch_size": 2, "providers": ["cpu"], "max_scales": 12}},
    )
    base = settings.engine_config()
    tiny = settings.engine_config("tiny")
    assert (tiny.max_batch_size, base.max_batch_size) == (2, 8)
    assert tiny.max_queue_size == base.max_queue_size
    assert tiny.runtime.providers == ("cpu",) and base.runtime.providers == ("cuda", "cpu")
    assert (tiny.limits.max_scales, base.limits.max_scales) == (12, 8)
    assert tiny.limits.max_crop == base.limits.max_crop == 4096
    with pytest.raises(ValidationError, match="unknown engine settings"):
        Settings(per_model={"tiny": {"batch": 2}})


def test_engine_defaults_are_written_once() -> None:
    """Settings' engine defaults are EngineConfig's: one source for each default."""
    assert Settings(_env_file=None).engine_config() == EngineConfig()


def test_every_setting_is_in_the_documented_table() -> None:
    """docs/api.md's settings table is what operators read: a setting missing there is hidden."""
    table = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^\| `SEGSERVE_([A-Z0-9_]+)`", table, flags=re.MULTILINE))
    assert {name.upper() for name in Settings.model_fields} <= documented


def wait_for(client: TestClient, predicate, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while not predicate(body := client.get("/readyz").json()):
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    return body


def test_per_model_override_reaches_the_engine(model_repository: Path) -> None:
    settings = Settings(
        model_repository=model_repository,
        providers=("cpu",),
        per_model={"tiny-float": {"max_batch_size": 3}},
    )
    app = create_app(settings)
    with TestClient(app) as client:
        wait_for(client, lambda body: body["ready"])
        manager = app.state.services.manager
        assert manager.get("tiny-float").config.max_batch_size == 3
        assert manager.get("tiny").config.max_batch_size == settings.max_batch_size


def test_mask_store_down_is_503_for_masks_only_and_still_ready(
    model_repository: Path, photos: dict[str, np.ndarray]
) -> None:
    """A Redis nobody listens on: JSON answers (which store a mask) get 503 store_unavailable,
    image outputs (which store nothing) still work, so /readyz stays 200 and reports the store."""
    settings = Settings(
        model_repository=model_repository,
        providers=("cpu",),
        mask_store=f"redis://127.0.0.1:{free_port()}/0",
    )
    buffer = io.BytesIO()
    Image.fromarray(photos["chelsea"]).save(buffer, format="PNG")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        body = wait_for(client, lambda body: "models are loading" not in body["problems"])
        assert body["ready"] is True and body["problems"] == []
        assert body["store"].startswith("unavailable: cannot reach mask: Redis at redis://")
        assert client.get("/readyz").status_code == 200
        stored = client.post("/segment", files={"image": buffer.getvalue()})
        assert stored.status_code == 503 and stored.json()["error"] == "store_unavailable"
        assert stored.headers["retry-after"] == "1"
        direct = client.post(
            "/segment", params={"output": "labels"}, files={"image": buffer.getvalue()}
        )
        assert direct.status_code == 200 and direct.headers["content-type"] == "image/png"
        fetched = client.get("/masks/AAAAAAAAAAAAAAAAAAAAAA.png")
        assert fetched.status_code == 503 and fetched.json()["error"] == "store_unavailable"
