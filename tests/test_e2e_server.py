"""A real ``python -m service`` process on a free loopback port, as the container runs it.

``SegserveServer`` is the harness every end-to-end module uses (one server per module); the tests
here check the process itself: it answers /healthz, becomes ready, publishes its OpenAPI schema,
and exits 0 on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SegserveServer:
    """Starts ``python -m service --host 127.0.0.1 --port P`` with ``SEGSERVE_*`` settings."""

    def __init__(self, repository: Path, log_path: Path, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEGSERVE_")}
        env.update(
            {
                "SEGSERVE_MODEL_REPOSITORY": str(repository),
                "SEGSERVE_PROVIDERS": "cpu",
                "SEGSERVE_INTRA_OP_THREADS": "1",
                "SEGSERVE_WORKER_THREADS": "2",
            }
        )
        env.update({f"SEGSERVE_{k.upper()}": str(v) for k, v in settings.items()})
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status (killed after ``timeout_s``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self._log.close()


def start_server(
    repository: Path, tmp_dir: Path, name: str = "server", **settings: object
) -> Iterator[SegserveServer]:
    """Generator body for module-scoped fixtures: start, wait for ready, yield, SIGTERM."""
    server = SegserveServer(repository, tmp_dir / f"{name}.log", **settings)
    try:
        server.wait_ready()
        yield server
    finally:
        server.terminate()


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
    }
    schema = httpx.get(f"{server.url}/openapi.json").json()
    paths = set(schema["paths"])
    assert {"/segment", "/masks/{mask_id}.png", "/masks/{mask_id}/labels.png"} <= paths
    assert {"/masks/{mask_id}/overlay.png", "/models", "/models/{name}", "/readyz"} <= paths
    body = schema["paths"]["/segment"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "image/*"}
    assert httpx.get(f"{server.url}/docs").status_code == 200


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
