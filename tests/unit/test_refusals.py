"""Every 503 with Retry-After is counted in ``segserve_rejected_total`` by its reason, read back
through Prometheus' own text parser: the alert that says "add replicas" and the dashboard's
rejected/s series saw only a full queue, not a full memory budget or a draining server."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_api import make_client, wait_ready


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[TestClient]:
    with make_client(model_repository, max_inflight_bytes=64 << 20) as test_client:
        wait_ready(test_client)
        yield test_client


def rejected(client: TestClient) -> dict[tuple[str, str], float]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    family = next(f for f in families if f.name == "segserve_rejected")
    return {
        (s.labels["model"], s.labels["reason"]): s.value
        for s in family.samples
        if s.name == "segserve_rejected_total"
    }


def refused(client: TestClient, body: bytes) -> None:
    answer = client.post("/segment?model=tiny", content=body, headers={"content-type": "image/png"})
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"]


def test_refusals_are_counted_by_reason(client: TestClient, photos: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    Image.fromarray(photos["chelsea"]).save(buffer, format="PNG")
    body = buffer.getvalue()
    services = client.app.state.services  # type: ignore[attr-defined]
    before = rejected(client)
    with services.admission.request() as other:  # another request holds all but 100 kB
        other.hold((64 << 20) - 100_000, "another request")
        refused(client, body)
        refused(client, body)
    services.lifecycle.begin_drain()
    try:
        refused(client, body)
    finally:
        services.lifecycle.draining = False
    after = rejected(client)
    memory, draining = ("tiny", "memory"), ("", "draining")  # draining: before the model is read
    assert after[memory] - before.get(memory, 0) == 2
    assert after[draining] - before.get(draining, 0) == 1
    assert client.post("/segment?model=tiny", content=body).status_code != 503
