"""The serving image's exact kernel bake, CMD and HEALTHCHECK, parsed from the Dockerfile and run
as the image runs them (no Docker engine here): from a directory holding only ``service/`` and the
baked cache (the image's /app),
the image's ENV, its port 8000 inside a private network namespace (so a developer's server on
8000 does not interfere), and a ``torch`` that fails to import, since the image has none. Also
``scripts/serve.sh``, the local "run the service" command, on a repository that has a bundle."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.test_deploy import (
    REPO_ROOT,
    bake_command,
    dockerfile_stages,
    exec_form,
    stage_env,
    stage_instructions,
)
from tests.servers import free_port, tcp_sockets

# Runs inside the namespace: loopback up, the CMD started, the HEALTHCHECK run before and after
# readiness, SIGTERM, then one JSON line with what happened.
DRIVER = r"""
import json, signal, subprocess, sys, time, urllib.request
command, health = json.loads(sys.argv[1]), json.loads(sys.argv[2])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
report = {"health_before": subprocess.run(health, timeout=30).returncode}
server = subprocess.Popen(command)
deadline, ready = time.monotonic() + 120, None
while time.monotonic() < deadline and server.poll() is None:
    try:
        with urllib.request.urlopen("http://127.0.0.1:8000/readyz", timeout=2) as response:
            ready = (response.status, json.loads(response.read()))
            break
    except OSError:
        time.sleep(0.2)
report["ready"] = ready
report["health_after"] = subprocess.run(health, timeout=30).returncode
with urllib.request.urlopen("http://127.0.0.1:8000/models", timeout=5) as response:
    report["models"] = [m["name"] for m in json.loads(response.read())]
server.send_signal(signal.SIGTERM)
report["exit"] = server.wait(60)
print(json.dumps(report))
"""


def can_unshare_network() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


def files(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in directory.rglob("*")
        if path.is_file()
    }


def test_image_bakes_kernels_then_cmd_serves_and_healthcheck_follows_readiness(
    model_repository: Path, tmp_path: Path
) -> None:
    """The serving image's build and start, rehearsed: its bake line, as written, compiles the
    Numba kernels into WORKDIR/numba-cache; its CMD serves with them copied into the runtime
    cache and compiles nothing more (baking the label-map kernels alone left the TTA kernels,
    about 30 s of every container start); its HEALTHCHECK fails before readiness and passes
    after."""
    if not can_unshare_network():
        pytest.fail("needs `unshare --net` (root or CAP_SYS_ADMIN) and iproute2's `ip`")
    stages = dockerfile_stages()
    command = exec_form(stage_instructions(stages, "serve", "CMD")[-1])
    (health_line,) = stage_instructions(stages, "serve", "HEALTHCHECK")
    health = exec_form(health_line[health_line.index("CMD") + 3 :].strip())
    assert exec_form(stage_instructions(stages, "serve-cpu", "CMD")[-1]) == command

    (workdir,) = set(stage_instructions(stages, "serve", "WORKDIR"))
    app = tmp_path / "app"  # the image's WORKDIR: only service/ is copied there
    shutil.copytree(
        REPO_ROOT / "service", app / "service", ignore=shutil.ignore_patterns("__pycache__")
    )
    (app / "torch").mkdir()
    (app / "torch" / "__init__.py").write_text("raise ImportError('no torch in the image')\n")
    env = stage_env(stages, "serve-cpu")  # the GPU image's ENV asks for CUDA, absent here
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = env["PATH"].replace("/opt/venv/bin", venv_bin)
    env["HOME"] = str(tmp_path)
    env["LANG"] = os.environ.get("LANG", "C.UTF-8")

    assignment, *bake = shlex.split(bake_command(stages))
    name, baked_in_image = assignment.split("=", 1)
    assert name == "NUMBA_CACHE_DIR" and bake[0] == "python"
    baked = app / Path(baked_in_image).relative_to(workdir)
    subprocess.run(bake, cwd=app, env=env | {name: str(baked)}, check=True, timeout=300)
    kernels = files(baked)
    assert any(name.endswith(".nbc") for name in kernels)

    env["SEGSERVE_MODEL_REPOSITORY"] = str(model_repository)  # the image mounts it at /models
    env["SEGSERVE_INTRA_OP_THREADS"] = "1"
    runtime_cache = tmp_path / Path(env["NUMBA_CACHE_DIR"]).relative_to("/")  # /tmp/numba-cache
    env["NUMBA_CACHE_DIR"] = str(runtime_cache)
    driver = [sys.executable, "-c", DRIVER, json.dumps(command), json.dumps(health)]
    result = subprocess.run(
        ["unshare", "--net", "--", *driver],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["health_before"] != 0  # nothing listening yet: unhealthy
    assert report["ready"] is not None, result.stderr
    status, body = report["ready"]
    assert status == 200 and body["ready"] is True
    assert report["health_after"] == 0
    assert sorted(report["models"]) == sorted(p.name for p in model_repository.iterdir())
    assert report["exit"] == 0, result.stderr
    started_with = files(runtime_cache)
    assert started_with == kernels, sorted(set(started_with) ^ set(kernels))


def test_serve_script_serves_an_existing_repository_without_exporting(
    model_repository: Path, tmp_path: Path
) -> None:
    """scripts/serve.sh (the README's "run the service"): reuses .venv, exports nothing when the
    repository already holds a bundle, and serves it on the port it is given, on loopback only
    unless told otherwise (no API key is asked for)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGSERVE_")}
    env |= {
        "SEGSERVE_MODEL_REPOSITORY": str(model_repository),
        "SEGSERVE_PROVIDERS": "cpu",
        "SEGSERVE_INTRA_OP_THREADS": "1",
        "PORT": str(port),
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["bash", str(REPO_ROOT / "scripts" / "serve.sh")],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 240  # setup_env may run pip once for the export profile
            status = None
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
                except httpx.TransportError:
                    status = None
                if status == 200:
                    break
                time.sleep(0.3)
            assert status == 200, log_path.read_text()
            listening = {s.address for s in tcp_sockets() if s.listening and s.port == port}
            assert listening == {"127.0.0.1"}
            models = httpx.get(f"http://127.0.0.1:{port}/models", timeout=10).json()
            assert sorted(m["name"] for m in models) == sorted(
                p.name for p in model_repository.iterdir()
            )
        finally:
            process.send_signal(signal.SIGTERM)  # exec'd: the server itself gets it
            exit_code = process.wait(60)
    assert exit_code == 0
    assert "exporting" not in log_path.read_text()
    assert sorted(p.name for p in model_repository.iterdir()) == ["tiny", "tiny-float"]
