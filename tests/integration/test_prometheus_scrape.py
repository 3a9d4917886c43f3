"""A real Prometheus (Debian's) scrapes a real segserve with our deploy/prometheus config (only
the target address changed) and answers through its HTTP API: the target is up, segserve series
have the values the requests made, and our recording rules evaluate."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.integration.test_deploy import PROMETHEUS_CONFIG
from tests.servers import SegserveServer, free_port, start_server

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@pytest.fixture(scope="module")
def segserve(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SegserveServer]:
    yield from start_server(model_repository, tmp_path_factory.mktemp("scraped"))


def prometheus_config(target: str) -> dict[str, Any]:
    """Our compose config with segserve at ``target``, scraping every second; the DCGM job (an
    exporter that needs a GPU) is left out."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["scrape_configs"] = [j for j in config["scrape_configs"] if j["job_name"] == "segserve"]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / name) for name in config["rule_files"]]
    return config


def query(api: httpx.Client, promql: str) -> list[dict[str, Any]]:
    response = api.get("/api/v1/query", params={"query": promql})
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def wait_for(check: Any, what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"Prometheus never showed {what} within {timeout_s} s")


def test_prometheus_scrapes_segserve(
    segserve: SegserveServer, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus missing: scripts/system_packages.sh installs Debian's prometheus")
    buffer = io.BytesIO()
    Image.fromarray(photos["chelsea"]).save(buffer, format="JPEG")
    with httpx.Client(base_url=segserve.url, timeout=60) as client:
        for _ in range(3):
            response = client.post(
                "/segment",
                params={"model": "tiny", "output": "labels"},
                content=buffer.getvalue(),
                headers={"content-type": "image/jpeg"},
            )
            assert response.status_code == 200, response.text

    config_path = tmp_path / "prometheus.yml"
    target = segserve.url.removeprefix("http://")
    config_path.write_text(yaml.safe_dump(prometheus_config(target)))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    flags = [f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
    flags += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    process = subprocess.Popen(
        [PROMETHEUS, *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
            wait_for(lambda: _ready(api), "its own readiness")

            def segserve_target() -> dict[str, Any] | None:
                targets = api.get("/api/v1/targets").json()["data"]["activeTargets"]
                up = [t for t in targets if t["labels"]["job"] == "segserve"]
                return up[0] if up and up[0]["health"] == "up" else None

            scraped = wait_for(segserve_target, "the segserve target up")
            assert scraped["scrapeUrl"] == f"{segserve.url}/metrics"
            assert query(api, 'up{job="segserve"}')[0]["value"][1] == "1"

            requests = wait_for(
                lambda: query(
                    api, 'segserve_requests_total{endpoint="/segment", model="tiny", status="200"}'
                ),
                "segserve_requests_total",
            )
            assert float(requests[0]["value"][1]) == 3.0
            images = query(api, 'segserve_images_total{model="tiny"}')
            assert float(images[0]["value"][1]) == 3.0
            loaded = query(api, "segserve_model_loaded")
            assert {s["metric"]["model"] for s in loaded} == {"tiny", "tiny-float"}
            assert all(s["value"][1] == "1" for s in loaded)
            depth = wait_for(
                lambda: query(api, "segserve:queue_depth:sum"), "the queue-depth recording rule"
            )
            # Only the model that saw traffic has a queue series; it is idle now.
            assert [(s["metric"]["model"], s["value"][1]) for s in depth] == [("tiny", "0")]
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _ready(api: httpx.Client) -> bool:
    try:
        return api.get("/-/ready").status_code == 200
    except httpx.TransportError:
        return False
