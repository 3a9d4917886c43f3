"""/metrics after real requests: every value moves by exactly what the requests did, read with
prometheus_client's own parser, linted by ``promtool check metrics`` and scraped by a real
Prometheus server."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import SegserveServer, free_port, start_server

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SegserveServer]:
    yield from start_server(model_repository, tmp_path_factory.mktemp("metrics"))


def scrape_text(server: SegserveServer) -> str:
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return response.text


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_move_with_real_requests(
    server: SegserveServer, photos: dict[str, np.ndarray]
) -> None:
    before = samples(scrape_text(server))
    images = [photos["chelsea"], photos["coffee"], photos["rocket"][:200, :300]]
    inputs = 0
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for index, image in enumerate(images):
            params = {"model": "tiny-float"} if index == 2 else {}
            result = client.post("/segment", params=params, files={"image": png_bytes(image)})
            assert result.status_code == 200
            inputs += result.json()["num_inputs"]
        assert (
            client.post(
                "/segment", content=b"text", headers={"content-type": "text/plain"}
            ).status_code
            == 415
        )
        assert client.post("/segment", params={"model": "nope"}, content=b"x").status_code == 404
        assert client.get("/healthz").status_code == 200
    after = samples(scrape_text(server))

    def moved(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    requests = "segserve_requests_total"
    assert moved(requests, model="tiny", endpoint="/segment", status="200") == 2
    assert moved(requests, model="tiny-float", endpoint="/segment", status="200") == 1
    assert moved(requests, model="tiny", endpoint="/segment", status="415") == 1
    assert moved(requests, model="", endpoint="/segment", status="404") == 1
    assert moved(requests, model="", endpoint="/healthz", status="200") == 1
    latency = "segserve_request_duration_seconds_count"
    assert moved(latency, model="tiny", endpoint="/segment") == 3
    assert moved(latency, model="tiny-float", endpoint="/segment") == 1

    for stage in ("decode", "preprocess", "queue_wait", "inference", "postprocess", "encode"):
        assert moved("segserve_stage_duration_seconds_count", model="tiny", stage=stage) == 2, stage
        assert moved("segserve_stage_duration_seconds_count", model="tiny-float", stage=stage) == 1
        assert moved("segserve_stage_duration_seconds_sum", model="tiny", stage=stage) >= 0
    stage_time = sum(
        moved("segserve_stage_duration_seconds_sum", model="tiny", stage=stage)
        for stage in ("decode", "encode")
    )
    assert (
        0
        < stage_time
        < moved("segserve_request_duration_seconds_sum", model="tiny", endpoint="/segment")
    )

    assert moved("segserve_images_total", model="tiny") == 2
    pixels = sum(image.shape[0] * image.shape[1] for image in images[:2])
    assert moved("segserve_pixels_total", model="tiny") == pixels
    assert moved("segserve_pixels_total", model="tiny-float") == 200 * 300
    windows = sum(
        moved("segserve_windows_per_request_sum", model=m) for m in ("tiny", "tiny-float")
    )
    assert windows == inputs
    # Every model input runs in exactly one batch: the batch sizes add up to the inputs.
    ran = sum(moved("segserve_batch_size_sum", model=m) for m in ("tiny", "tiny-float"))
    assert ran == inputs
    assert after[("segserve_queue_depth", (("model", "tiny"),))] == 0
    loaded = ("segserve_model_loaded", (("model", "tiny"), ("provider", "CPUExecutionProvider")))
    assert after[loaded] == 1
    assert after[("process_resident_memory_bytes", ())] > 10_000_000


def test_names_follow_prometheus_conventions(server: SegserveServer) -> None:
    families = list(text_string_to_metric_families(scrape_text(server)))
    ours = [f for f in families if f.name.startswith("segserve_")]
    assert len(ours) >= 10
    for family in ours:
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram" and ("duration" in family.name or "wait" in family.name):
            assert family.name.endswith("_seconds"), family.name


def test_promtool_lints_the_exposition(server: SegserveServer) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/system_packages.sh installs Debian's prometheus"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=scrape_text(server), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_real_prometheus_scrapes_the_server(server: SegserveServer, tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus missing: scripts/system_packages.sh installs it"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: segserve\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = 'segserve_model_loaded{model="tiny"}'
        deadline = time.monotonic() + 45
        result: list = []
        while time.monotonic() < deadline and not result:
            time.sleep(0.5)
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query})
            except httpx.TransportError:
                continue
            result = answer.json()["data"]["result"] if answer.status_code == 200 else []
        assert result, "Prometheus never stored a sample from segserve"
        assert result[0]["metric"]["job"] == "segserve" and float(result[0]["value"][1]) == 1.0
    finally:
        process.terminate()
        process.wait(10)


def test_parallel_runs_under_concurrent_requests(
    model_repository: Path, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A server on two threads with two parallel runs: concurrent clients get the labels each
    image gets alone, and ``segserve_runs_beside_total`` counts the runs that went beside."""
    images = [photos[name][:160, :240] for name in ("chelsea", "coffee", "astronaut", "rocket")]
    bodies = [png_bytes(image) for image in images] * 4
    for server in start_server(
        model_repository, tmp_path, intra_op_threads=2, parallel_runs=2, max_batch_size=1
    ):
        with httpx.Client(base_url=server.url, timeout=60) as client:

            def labels(body: bytes) -> np.ndarray:
                answer = client.post("/segment", params={"output": "labels"}, files={"image": body})
                assert answer.status_code == 200, answer.text
                return np.asarray(Image.open(io.BytesIO(answer.content)))

            alone = [labels(body) for body in bodies]
            before = samples(scrape_text(server))
            with ThreadPoolExecutor(8) as pool:
                together = list(pool.map(labels, bodies))
            after = samples(scrape_text(server))
        for one, other in zip(alone, together, strict=True):
            np.testing.assert_array_equal(one, other)
        beside = delta(before, after, "segserve_runs_beside_total", model="tiny")
        assert 0 < beside <= len(bodies)
        assert delta(before, after, "segserve_batch_size_count", model="tiny") == len(bodies)
