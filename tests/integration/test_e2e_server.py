"""A real ``python -m service`` process on a free loopback port, as the container runs it.

``SegserveServer`` is the harness every end-to-end module uses (one server per module); the tests
here check the process itself: it answers /healthz, becomes ready, publishes its OpenAPI schema,
and exits 0 on SIGTERM.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import REPO_ROOT, SegserveServer, start_server


@pytest.fixture(scope="module")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SegserveServer]:
    yield from start_server(model_repository, tmp_path_factory.mktemp("e2e_server"))


def test_health_ready_and_openapi(server: SegserveServer) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready == {
        "ready": True,
        "draining": False,
        "models": ["tiny", "tiny-float"],
        "problems": [],
        "store": "ok",
    }
    schema = httpx.get(f"{server.url}/openapi.json").json()
    paths = set(schema["paths"])
    assert {"/segment", "/masks/{mask_id}.png", "/masks/{mask_id}/labels.png"} <= paths
    assert {"/masks/{mask_id}/overlay.png", "/models", "/models/{name}", "/readyz"} <= paths
    body = schema["paths"]["/segment"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "image/*"}
    assert httpx.get(f"{server.url}/docs").status_code == 200
    # The README promises the log says a random-init model's masks mean nothing.
    assert "model tiny is UNTRAINED (exported with --random-init)" in server.log()


def test_head_is_answered_as_get_without_a_body(server: SegserveServer) -> None:
    """Load balancers probe with HEAD (it was a 405 everywhere): same status and headers as GET,
    no body, through uvicorn's HTTP/1.1 framing; a POST-only route stays a 405."""
    for path in ("/healthz", "/readyz", "/", "/v2/health/ready", "/models"):
        get, head = httpx.get(f"{server.url}{path}"), httpx.head(f"{server.url}{path}")
        assert (head.status_code, get.status_code) == (200, 200), path
        assert head.content == b"" and get.content
        assert head.headers["content-length"] == str(len(get.content))
        assert head.headers["content-type"] == get.headers["content-type"]
    assert httpx.head(f"{server.url}/segment").status_code == 405
    assert httpx.head(f"{server.url}/masks/unknownmaskid0000000000.png").status_code == 404


def _requests_by_endpoint(server: SegserveServer, status: str) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {
        sample.labels["endpoint"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "segserve_requests_total" and sample.labels["status"] == status
    }


def test_head_requests_are_counted_under_their_route(server: SegserveServer) -> None:
    """A load balancer's HEAD probes count under the route they hit, as GETs do (they were all
    ``endpoint="unmatched"``: the route was recorded on the GET copy of the request)."""
    before = _requests_by_endpoint(server, "200")
    for _ in range(3):
        assert httpx.head(f"{server.url}/healthz").status_code == 200
    assert httpx.head(f"{server.url}/v2/health/ready").status_code == 200
    after = _requests_by_endpoint(server, "200")
    assert after["/healthz"] - before.get("/healthz", 0) == 3
    assert after["/v2/health/ready"] - before.get("/v2/health/ready", 0) == 1
    assert after.get("unmatched", 0) == before.get("unmatched", 0)


def test_unknown_route_is_a_json_404(server: SegserveServer) -> None:
    response = httpx.get(f"{server.url}/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_idle_server_exits_zero_on_sigterm(model_repository: Path, tmp_path: Path) -> None:
    server = SegserveServer(model_repository, tmp_path / "idle.log")
    server.wait_ready()
    started = time.monotonic()
    assert server.terminate(timeout_s=30) == 0, server.log()
    assert time.monotonic() - started < 15
    assert "Traceback" not in server.log()


def test_a_repository_that_fails_to_load_exits_one(tmp_path: Path) -> None:
    empty = tmp_path / "empty_repository"
    empty.mkdir()
    server = SegserveServer(empty, tmp_path / "empty.log")
    assert server.process.wait(60) == 1
    assert "no model bundles" in server.log()
    server.terminate()


def test_the_serving_entry_point_never_imports_torch() -> None:
    """``python -m service`` runs in the serve image, which has no PyTorch."""
    probe = (
        "import sys, runpy; sys.argv = ['service', '--help']\n"
        "try:\n    runpy.run_module('service', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "import service.http, service.engine, service.store, service.render, service.imageio\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers'})\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m service" in result.stdout
    assert result.stdout.strip().endswith("[]"), result.stdout
