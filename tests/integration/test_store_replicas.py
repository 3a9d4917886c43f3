"""Two real ``python -m service`` replicas sharing one real redis-server: a mask posted to one is
rendered identically by the other, expiry is Redis' own, and a Redis outage gives 503s on the
calls that need the store (not on /readyz) and heals by itself when Redis is back, also when
Redis is killed and restarted under load."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servers import REDIS_SERVER, RedisProcess, SegserveServer

MASK_TTL_S = 120


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def decode_png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server missing: run scripts/system_packages.sh")
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(
    model_repository: Path,
    redis_server: RedisProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    logs = tmp_path_factory.mktemp("replicas")
    servers = [
        SegserveServer(
            model_repository,
            logs / f"replica-{name}.log",
            mask_store=redis_server.url,
            mask_ttl_s=MASK_TTL_S,
        )
        for name in "ab"
    ]
    try:
        for server in servers:
            server.wait_ready()
        with (
            httpx.Client(base_url=servers[0].url, timeout=60) as a,
            httpx.Client(base_url=servers[1].url, timeout=60) as b,
        ):
            yield a, b
    finally:
        for server in servers:
            server.terminate()


def segment_json(client: httpx.Client, image: np.ndarray) -> dict[str, object]:
    response = client.post(
        "/segment", params={"model": "tiny"}, files={"image": ("p.jpg", jpeg_bytes(image))}
    )
    assert response.status_code == 200, response.text
    result: dict[str, object] = response.json()
    return result


RENDERINGS = ("png", "labels", "overlay")


def test_mask_from_one_replica_renders_identically_on_the_other(
    replicas: tuple[httpx.Client, httpx.Client],
    redis_server: RedisProcess,
    photos: dict[str, np.ndarray],
) -> None:
    a, b = replicas
    for maker, other, photo in ((a, b, "chelsea"), (b, a, "coffee")):
        image = photos[photo]
        result = segment_json(maker, image)
        urls = result["urls"]
        assert isinstance(urls, dict) and set(RENDERINGS) <= set(urls)
        for rendering in RENDERINGS:
            mine = maker.get(urls[rendering])
            theirs = other.get(urls[rendering])
            assert mine.status_code == theirs.status_code == 200, theirs.text
            assert theirs.headers["content-type"] == "image/png"
            assert theirs.content == mine.content, rendering
        labels = decode_png(other.get(urls["labels"]).content)
        direct = maker.post(
            "/segment",
            params={"model": "tiny", "output": "labels"},
            files={"image": ("p.jpg", jpeg_bytes(image))},
        )
        np.testing.assert_array_equal(labels, decode_png(direct.content))
        assert labels.shape == image.shape[:2]
        assert len(np.unique(labels)) > 1  # a real map, not a constant image
    keys = list(redis_server.client().scan_iter("segserve:mask:*"))
    assert len(keys) == 2
    ttl_ms = redis_server.client().pttl(keys[0])
    assert (MASK_TTL_S - 30) * 1000 < ttl_ms <= MASK_TTL_S * 1000  # the setting, set in Redis


def test_expiry_in_redis_is_seen_by_both_replicas(
    replicas: tuple[httpx.Client, httpx.Client],
    redis_server: RedisProcess,
    photos: dict[str, np.ndarray],
) -> None:
    a, b = replicas
    result = segment_json(a, photos["rocket"])
    mask_id = result["mask_id"]
    assert isinstance(mask_id, str)
    assert b.get(f"/masks/{mask_id}.png").status_code == 200
    key = f"segserve:mask:{mask_id}"
    assert redis_server.client().pexpire(key, 1)  # Redis expires it...
    time.sleep(0.05)  # ...once its millisecond has passed (a fast replica can ask sooner)
    assert not redis_server.client().exists(key)
    for client in (a, b):
        response = client.get(f"/masks/{mask_id}/labels.png")
        assert response.status_code == 404, response.text


def test_redis_outage_gives_503_on_mask_calls_only_then_recovers(
    replicas: tuple[httpx.Client, httpx.Client],
    redis_server: RedisProcess,
    photos: dict[str, np.ndarray],
) -> None:
    a, b = replicas
    image = photos["astronaut"][::2, ::2].copy()
    before = segment_json(a, image)
    redis_server.stop()
    try:
        for client in (a, b):
            ready = client.get("/readyz")  # still in the Service: most calls do not need Redis
            assert ready.status_code == 200, ready.text
            assert ready.json()["store"].startswith("unavailable: ")
            fetched = client.get(f"/masks/{before['mask_id']}.png")
            assert fetched.status_code == 503, fetched.text
            assert fetched.json()["error"] == "store_unavailable"
            assert fetched.headers["retry-after"] == "1"
            posted = client.post(
                "/segment", params={"model": "tiny"}, files={"image": ("p.jpg", jpeg_bytes(image))}
            )
            assert posted.status_code == 503, posted.text
            assert posted.json()["error"] == "store_unavailable"
            # Renderings that do not keep a mask do not need the store.
            direct = client.post(
                "/segment",
                params={"model": "tiny", "output": "png"},
                files={"image": ("p.jpg", jpeg_bytes(image))},
            )
            assert direct.status_code == 200
    finally:
        redis_server.start()  # same port, empty
    for client in (a, b):
        assert client.get("/readyz").json()["store"] == "ok"
        assert client.get(f"/masks/{before['mask_id']}.png").status_code == 404  # gone, not mixed
    after = segment_json(b, image)
    assert a.get(f"/masks/{after['mask_id']}/overlay.png").status_code == 200


@dataclass
class Posted:
    sent_at: float
    photo: str
    status: int
    mask_id: str | None


def post_loop(
    client: httpx.Client, images: dict[str, bytes], posted: list[Posted], stop: threading.Event
) -> None:
    """JSON /segment calls back to back, cycling through the photos, until told to stop."""
    names = list(images)
    i = 0
    while not stop.is_set():
        name = names[i % len(names)]
        i += 1
        sent = time.monotonic()
        response = client.post(
            "/segment", params={"model": "tiny"}, files={"image": ("p.jpg", images[name])}
        )
        body = response.json()
        posted.append(Posted(sent, name, response.status_code, body.get("mask_id")))


def test_redis_killed_and_restarted_under_load(
    replicas: tuple[httpx.Client, httpx.Client],
    redis_server: RedisProcess,
    photos: dict[str, np.ndarray],
) -> None:
    """Both replicas posting masks while Redis is killed and restarted: every call answers 200 or
    503 store_unavailable, both replicas stay ready, every call sent after the restart succeeds,
    and every mask they acknowledged is fetchable from both replicas with its own photo's labels
    (nothing lost, nothing mixed up)."""
    small = {name: photos[name][::4, ::4].copy() for name in ("chelsea", "coffee", "rocket")}
    images = {name: jpeg_bytes(image) for name, image in small.items()}
    a, b = replicas
    expected = {
        name: decode_png(
            a.post(
                "/segment",
                params={"model": "tiny", "output": "labels"},
                files={"image": ("p.jpg", body)},
            ).content
        )
        for name, body in images.items()
    }
    assert len({e.tobytes() for e in expected.values()}) == 3  # a mix-up would show
    posted: list[Posted] = []
    stop = threading.Event()
    loops = [
        threading.Thread(target=post_loop, args=(client, images, posted, stop))
        for client in (a, b, a, b)
    ]
    for loop in loops:
        loop.start()
    try:
        time.sleep(0.5)
        redis_server.stop()
        time.sleep(0.5)
        for client in (a, b):
            assert client.get("/readyz").status_code == 200
        redis_server.start()
        restarted_at = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for loop in loops:
            loop.join(60)
    assert {p.status for p in posted} <= {200, 503}
    after = [p for p in posted if p.sent_at > restarted_at]
    assert len(after) >= 4 and all(p.status == 200 for p in after), after
    assert any(p.status == 503 for p in posted if p.sent_at < restarted_at)  # the outage was seen
    acknowledged = [p for p in after if p.status == 200]
    for p in acknowledged:
        for client in (a, b):
            labels = client.get(f"/masks/{p.mask_id}/labels.png")
            assert labels.status_code == 200, labels.text
            np.testing.assert_array_equal(decode_png(labels.content), expected[p.photo])


def test_redis_at_maxmemory_keeps_accepting_masks_over_http(
    replicas: tuple[httpx.Client, httpx.Client],
    redis_server: RedisProcess,
    photos: dict[str, np.ndarray],
) -> None:
    """The issue's measurement, through both servers: Redis' maxmemory (noeviction) far below the
    store's byte budget. Before, every JSON /segment answered 503 once Redis was full; now every
    one succeeds, the newest masks render, the oldest are gone, and Redis stays under its limit."""
    client = redis_server.client()
    client.flushall()
    image = photos["astronaut"][::2, ::2].copy()
    for replica in replicas:  # connections and the script's one-time memory, before measuring
        warm = segment_json(replica, image)
    mask_bytes = client.strlen(f"segserve:mask:{warm['mask_id']}")  # about 40 KB with its photo
    client.config_set("maxmemory-policy", "noeviction")
    limit = client.info("memory")["used_memory"] + 8 * mask_bytes
    client.config_set("maxmemory", str(limit))
    try:
        ids = [str(segment_json(replicas[i % 2], image)["mask_id"]) for i in range(30)]
        statuses = [replicas[0].get(f"/masks/{mask_id}/labels.png").status_code for mask_id in ids]
        assert statuses[-3:] == [200, 200, 200] and statuses[0] == 404, statuses
        assert statuses == sorted(statuses, reverse=True)  # oldest evicted first
        assert client.info("memory")["used_memory"] <= limit
    finally:
        client.config_set("maxmemory", "0")
