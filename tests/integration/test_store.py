"""The mask store: round trips, limits and failures, against a real redis-server process."""

from __future__ import annotations

import asyncio
import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from skimage import data, filters

from service.errors import MaskNotFoundError, PayloadTooLargeError, StoreUnavailableError
from service.store import (
    _PUT_SCRIPT,
    MemoryMaskStore,
    RedisMaskStore,
    StoredMask,
    create_store,
    decode_mask,
    encode_mask,
)
from tests.servers import REDIS_SERVER, RedisProcess


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server missing: run scripts/system_packages.sh")
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


def astronaut_labels() -> np.ndarray:
    """A label map with regions like a real one: the astronaut photo, blurred, in 8 grey bands."""
    grey = filters.gaussian(data.astronaut()[::4, ::4].mean(axis=2) / 255, sigma=3)
    return np.minimum(grey * 8, 7).astype(np.uint8)


def mask_of(
    labels: np.ndarray, model: str = "segformer-b0", jpeg: bytes | None = None
) -> StoredMask:
    return StoredMask(model=model, labels=labels, palette_version="a1b2c3d4", image_jpeg=jpeg)


def noise_labels(seed: int, size: int = 64) -> np.ndarray:
    """Incompressible labels, so each mask's stored size is known to within the header."""
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def test_blob_round_trip_is_exact_and_compressed() -> None:
    labels = astronaut_labels()
    jpeg = b"\xff\xd8 not really a jpeg \xff\xd9"
    blob = encode_mask("id-1", mask_of(labels, jpeg=jpeg))
    back = decode_mask("id-1", blob)
    np.testing.assert_array_equal(back.labels, labels)
    assert back.labels.dtype == np.uint8
    assert (back.model, back.palette_version, back.image_jpeg) == ("segformer-b0", "a1b2c3d4", jpeg)
    assert len(blob) < labels.nbytes / 4

    wide = (astronaut_labels().astype(np.uint16) * 1000 + 7).astype(np.uint16)  # > 255 classes
    back16 = decode_mask("id-2", encode_mask("id-2", mask_of(wide)))
    assert back16.labels.dtype == np.uint16
    np.testing.assert_array_equal(back16.labels, wide)
    assert back16.image_jpeg is None


def test_blob_written_by_a_zlib_replica_still_reads() -> None:
    """Before zstd, records carried zlib labels and no codec: a rolling upgrade sharing Redis
    must still read them. This is that record, built by hand as the old encoder wrote it."""
    labels = astronaut_labels()
    packed = zlib.compress(labels.tobytes(), 3)
    header = json.dumps(
        {"id": "old-1", "model": "segformer-b0", "palette_version": "a1b2c3d4", "dtype": "uint8",
         "shape": list(labels.shape), "labels_bytes": len(packed), "image_bytes": None},
        separators=(",", ":"),
    ).encode()  # fmt: skip
    blob = b"SEGMASK1" + struct.pack("<I", len(header)) + header + packed
    np.testing.assert_array_equal(decode_mask("old-1", blob).labels, labels)
    new = encode_mask("new-1", mask_of(labels))
    (new_header_length,) = struct.unpack_from("<I", new, 8)
    assert json.loads(new[12 : 12 + new_header_length])["codec"] == "zstd"


def test_blob_refuses_other_ids_damage_and_bad_labels() -> None:
    blob = encode_mask("id-1", mask_of(astronaut_labels()))
    with pytest.raises(StoreUnavailableError, match="belongs to mask"):
        decode_mask("id-2", blob)
    with pytest.raises(StoreUnavailableError, match="damaged"):
        decode_mask("id-1", blob[:-10])
    (header_length,) = struct.unpack_from("<I", blob, 8)
    for offset in range(12 + header_length, len(blob)):  # every byte of the compressed labels
        flipped = bytearray(blob)
        flipped[offset] ^= 0x10
        try:
            back = decode_mask("id-1", bytes(flipped))
        except StoreUnavailableError:
            continue
        # Damage that decodes must not change the labels (the frame checksum sees to it).
        np.testing.assert_array_equal(back.labels, astronaut_labels())
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_mask("x", mask_of(astronaut_labels().astype(np.int32)))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        encode_mask("x", mask_of(np.zeros((2, 2, 3), np.uint8)))


def test_memory_round_trip_ids_and_not_found() -> None:
    async def scenario() -> None:
        store = create_store("memory", max_bytes=10_000_000, ttl_s=60)
        labels = astronaut_labels()
        ids = {await store.put(mask_of(labels, model=f"m{i}")) for i in range(20)}
        assert len(ids) == 20 and all(len(i) >= 22 for i in ids)
        for mask_id in ids:
            got = await store.get(mask_id)
            np.testing.assert_array_equal(got.labels, labels)
        with pytest.raises(MaskNotFoundError):
            await store.get("does-not-exist-aaaaaaaaaaaa")
        await store.check()
        await store.close()

    asyncio.run(scenario())


def test_memory_ttl_expires_on_access() -> None:
    now = [1000.0]
    store = MemoryMaskStore(max_bytes=10_000_000, ttl_s=30, clock=lambda: now[0])

    async def scenario() -> None:
        first = await store.put(mask_of(astronaut_labels()))
        now[0] += 20
        second = await store.put(mask_of(astronaut_labels()))
        now[0] += 15  # first is 35 s old, second 15 s
        with pytest.raises(MaskNotFoundError):
            await store.get(first)
        assert (await store.get(second)).model == "segformer-b0"
        assert len(store) == 1
        now[0] += 16
        with pytest.raises(MaskNotFoundError):
            await store.get(second)
        assert len(store) == 0 and store.total_bytes == 0

    asyncio.run(scenario())


def test_memory_byte_limit_evicts_oldest_first() -> None:
    one = len(encode_mask("x" * 22, mask_of(noise_labels(0))))
    store = MemoryMaskStore(max_bytes=3 * one + one // 2, ttl_s=60)

    async def scenario() -> None:
        ids = [await store.put(mask_of(noise_labels(seed))) for seed in range(5)]
        assert len(store) == 3
        assert store.total_bytes <= store.max_bytes
        for mask_id in ids[:2]:
            with pytest.raises(MaskNotFoundError):
                await store.get(mask_id)
        for seed, mask_id in enumerate(ids[2:], start=2):
            np.testing.assert_array_equal((await store.get(mask_id)).labels, noise_labels(seed))
        # Never storable: a 413 naming the limit, not the retryable 503 of a store that is down.
        with pytest.raises(PayloadTooLargeError, match="more than the whole mask store"):
            await store.put(mask_of(noise_labels(9, size=256)))

    asyncio.run(scenario())


def test_create_store_rejects_unknown_urls() -> None:
    with pytest.raises(ValueError, match="memory"):
        create_store("postgres://user:secret@db/x", 1000, 10)
    with pytest.raises(ValueError, match="positive"):
        create_store("memory", 0, 10)


def test_redis_round_trip_shared_between_two_clients(redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        replica_a = create_store(redis_server.url, max_bytes=10_000_000, ttl_s=60)
        replica_b = create_store(redis_server.url, max_bytes=10_000_000, ttl_s=60)
        labels = astronaut_labels()
        wide = labels.astype(np.uint16) * 300
        id_a = await replica_a.put(mask_of(labels, model="segformer-b0", jpeg=b"jpeg-a"))
        id_b = await replica_b.put(mask_of(wide, model="setr-pup"))
        got_a = await replica_b.get(id_a)
        got_b = await replica_a.get(id_b)
        np.testing.assert_array_equal(got_a.labels, labels)
        np.testing.assert_array_equal(got_b.labels, wide)
        assert (got_a.model, got_a.image_jpeg) == ("segformer-b0", b"jpeg-a")
        assert (got_b.model, got_b.labels.dtype, got_b.image_jpeg) == ("setr-pup", np.uint16, None)
        with pytest.raises(MaskNotFoundError):
            await replica_a.get("not-a-real-mask-id-000000")
        with pytest.raises(MaskNotFoundError):
            await replica_a.get("../../etc/passwd")
        await replica_a.check()
        await replica_a.close()
        await replica_b.close()

    asyncio.run(scenario())
    stored = redis_server.client().get(
        next(iter(redis_server.client().scan_iter("segserve:mask:*")))
    )
    assert stored is not None and len(stored) < astronaut_labels().nbytes  # compressed at rest


def test_redis_expiry_is_redis_own(redis_server: RedisProcess) -> None:
    client = redis_server.client()

    async def scenario() -> None:
        store = RedisMaskStore(redis_server.url, max_bytes=10_000_000, ttl_s=1.5)
        mask_id = await store.put(mask_of(astronaut_labels()))
        assert 0 < client.pttl(f"segserve:mask:{mask_id}") <= 1500
        assert (await store.get(mask_id)).model == "segformer-b0"
        await asyncio.sleep(1.7)
        with pytest.raises(MaskNotFoundError):
            await store.get(mask_id)
        await store.close()

    asyncio.run(scenario())
    # Masks, index and byte counter all go by Redis' own expiry (its active cycle runs at 10 Hz).
    deadline = time.monotonic() + 5
    while client.dbsize() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.dbsize() == 0


def test_redis_byte_limit_evicts_oldest_across_replicas(redis_server: RedisProcess) -> None:
    one = len(encode_mask("x" * 22, mask_of(noise_labels(0))))
    limit = 3 * one + one // 2

    async def scenario() -> None:
        replicas = [RedisMaskStore(redis_server.url, limit, ttl_s=60) for _ in range(2)]
        ids = [await replicas[seed % 2].put(mask_of(noise_labels(seed))) for seed in range(5)]
        for mask_id in ids[:2]:
            with pytest.raises(MaskNotFoundError):
                await replicas[0].get(mask_id)
        for seed, mask_id in enumerate(ids[2:], start=2):
            got = await replicas[1].get(mask_id)
            np.testing.assert_array_equal(got.labels, noise_labels(seed))
        # Concurrent puts from both replicas: the bound holds and every surviving id is its own.
        labelled = [noise_labels(100 + i) for i in range(12)]
        new_ids = await asyncio.gather(
            *(replicas[i % 2].put(mask_of(labels)) for i, labels in enumerate(labelled))
        )
        survivors = 0
        for labels, mask_id in zip(labelled, new_ids, strict=True):
            try:
                got = await replicas[0].get(mask_id)
            except MaskNotFoundError:
                continue
            survivors += 1
            np.testing.assert_array_equal(got.labels, labels)
        assert survivors == 3
        with pytest.raises(PayloadTooLargeError, match="more than the whole mask store"):
            await replicas[0].put(mask_of(noise_labels(9, size=256)))
        for replica in replicas:
            await replica.close()

    asyncio.run(scenario())
    client = redis_server.client()
    stored = sum(len(client.get(key) or b"") for key in client.scan_iter("segserve:mask:*"))
    assert stored <= limit
    assert int(client.get("segserve:mask-bytes") or 0) == stored


def test_redis_puts_within_one_clock_tick_still_evict_oldest_first(
    redis_server: RedisProcess,
) -> None:
    """Six puts in one transaction run within the same millisecond (often the same microsecond):
    eviction must still follow put order, not the order of the random ids."""
    client = redis_server.client()
    put = client.register_script(_PUT_SCRIPT)
    ids = [f"{'zyxwvu'[i]}{i:021d}" for i in range(6)]  # later ids sort first
    size, limit = 1000, 3500
    with client.pipeline(transaction=True) as transaction:
        for mask_id in ids:
            args = [b"\0" * size, 60_000, limit, f"{mask_id} {size}", "t:mask:"]
            put(
                keys=["t:mask-index", "t:mask-bytes", f"t:mask:{mask_id}"],
                args=args,
                client=transaction,
            )
        transaction.execute()
    assert [key.decode() for key in sorted(client.scan_iter("t:mask:*"))] == [
        f"t:mask:{mask_id}" for mask_id in sorted(ids[3:])
    ]
    assert int(client.get("t:mask-bytes") or 0) == 3 * size
    scores = [score for _, score in client.zrange("t:mask-index", 0, -1, withscores=True)]
    assert scores == sorted(set(scores))


def test_redis_down_gives_503_and_recovers(redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        store = RedisMaskStore(redis_server.url, 10_000_000, ttl_s=60, timeout_s=0.5)
        before = await store.put(mask_of(astronaut_labels()))
        redis_server.stop()
        with pytest.raises(StoreUnavailableError, match=r"Redis at redis://127\.0\.0\.1"):
            await store.check()
        with pytest.raises(StoreUnavailableError):
            await store.put(mask_of(astronaut_labels()))
        with pytest.raises(StoreUnavailableError):
            await store.get(before)
        redis_server.start()  # same port, empty: the old mask is gone, not mixed up
        await store.check()
        with pytest.raises(MaskNotFoundError):
            await store.get(before)
        after = await store.put(mask_of(astronaut_labels(), model="after-restart"))
        assert (await store.get(after)).model == "after-restart"
        await store.close()

    asyncio.run(scenario())


def test_redis_at_maxmemory_keeps_accepting_by_evicting_oldest(tmp_path: Path) -> None:
    """Redis' maxmemory (8 MB, noeviction as deployed) below the store's byte budget (12 MB): the
    put script makes room itself, so puts never stop, Redis stays under its limit, the newest
    masks are intact and the oldest are gone (before the fix: 503 after the 17th mask for good)."""
    server = RedisProcess(tmp_path, "--maxmemory", "8mb", "--maxmemory-policy", "noeviction")
    server.start()
    try:

        async def scenario() -> list[str]:
            store = RedisMaskStore(server.url, max_bytes=12_000_000, ttl_s=60)
            ids = [await store.put(mask_of(noise_labels(seed, 512))) for seed in range(60)]
            kept = []
            for seed, mask_id in enumerate(ids):
                try:
                    got = await store.get(mask_id)
                except MaskNotFoundError:
                    assert not kept, "an older mask survived a newer one"
                    continue
                np.testing.assert_array_equal(got.labels, noise_labels(seed, 512))
                kept.append(mask_id)
            await store.close()
            return kept

        client = server.client()
        kept = asyncio.run(scenario())
        assert 10 <= len(kept) < 32  # 262 KB each: most of 8 MB, far from 60
        memory = client.info("memory")
        assert memory["used_memory"] <= memory["maxmemory"]
        stored = [client.get(key) or b"" for key in client.scan_iter("segserve:mask:*")]
        assert len(stored) == len(kept)
        assert int(client.get("segserve:mask-bytes") or 0) == sum(map(len, stored))

        # An operator lowers maxmemory below what is used: Redis now refuses ordinary writes
        # (and scripts without allow-oom); the put script still makes room and writes.
        client.config_set("maxmemory", "4mb")
        with pytest.raises(redis.OutOfMemoryError):
            client.set("probe", b"x")
        kept = asyncio.run(scenario())
        assert 4 <= len(kept) < 16
        assert client.info("memory")["used_memory"] <= 4 * 2**20
    finally:
        server.stop()


def test_redis_full_of_other_data_gives_503_and_keeps_its_limit(tmp_path: Path) -> None:
    """With nothing of ours left to evict, the put is refused (503) without writing, and accepted
    again once the other data is gone."""
    server = RedisProcess(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    server.start()
    try:
        client = server.client()
        for i in range(64):
            try:
                client.set(f"other:{i}", b"x" * 100_000)
            except redis.OutOfMemoryError:
                break

        async def scenario() -> None:
            store = RedisMaskStore(server.url, max_bytes=100_000_000, ttl_s=60)
            with pytest.raises(StoreUnavailableError, match="out of memory"):
                await store.put(mask_of(noise_labels(1, 256)))
            assert not list(client.scan_iter("segserve:mask:*"))  # nothing written past the limit
            client.delete(*client.keys("other:*"))
            mask_id = await store.put(mask_of(noise_labels(2, 256)))
            np.testing.assert_array_equal((await store.get(mask_id)).labels, noise_labels(2, 256))
            await store.close()

        asyncio.run(scenario())
    finally:
        server.stop()


def test_redis_put_retried_after_a_lost_reply_counts_once(redis_server: RedisProcess) -> None:
    """The client retries a put whose reply a dying connection lost: the second run is a no-op."""
    client = redis_server.client()
    put = client.register_script(_PUT_SCRIPT)
    args = [b"\0" * 1000, 60_000, 10_000, "a000000000000000000000 1000", "t:mask:"]
    keys = ["t:mask-index", "t:mask-bytes", "t:mask:a000000000000000000000"]
    assert put(keys=keys, args=args) == 1000
    assert put(keys=keys, args=args) == 1000
    assert int(client.get("t:mask-bytes") or 0) == 1000
    assert client.zcard("t:mask-index") == 1


class ReplyCuttingProxy:
    """A TCP proxy in front of Redis that passes each of the next ``cuts_left`` ``EVALSHA``s on to
    Redis and then closes that client connection before Redis's reply arrives: a put cut off by a
    Redis restart after the pool found its connection alive."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.cuts_left = 0
        self.cut = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        upstream, to_redis = await asyncio.open_connection("127.0.0.1", self.redis_port)

        async def replies() -> None:
            while data := await upstream.read(65536):
                to_client.write(data)
                await to_client.drain()

        relay = asyncio.ensure_future(replies())
        try:
            while data := await client.read(65536):
                if self.cuts_left and b"EVALSHA" in data.upper():
                    relay.cancel()  # the reply is lost
                    await asyncio.gather(relay, return_exceptions=True)
                    self.cuts_left -= 1
                    to_redis.write(data)
                    await to_redis.drain()
                    await upstream.read(65536)  # Redis ran the script
                    self.cut += 1
                    break
                to_redis.write(data)
                await to_redis.drain()
        finally:
            relay.cancel()
            to_client.close()
            to_redis.close()


def test_redis_put_cut_off_by_a_lost_connection_is_retried_once(
    redis_server: RedisProcess,
) -> None:
    """A put whose connection dies after Redis ran it (the reply lost) succeeds on a new
    connection, and the retried script counts the mask once; a put cut off twice in a row is
    a 503, not a hang."""

    async def scenario() -> None:
        proxy = ReplyCuttingProxy(redis_server.port)
        store = RedisMaskStore(
            f"redis://127.0.0.1:{await proxy.start()}/0", 10_000_000, ttl_s=60, timeout_s=2
        )
        first = await store.put(mask_of(astronaut_labels(), model="first"))  # script loaded
        proxy.cuts_left = 1
        second = await store.put(mask_of(noise_labels(3), model="second"))
        assert proxy.cut == 1
        assert (await store.get(first)).model == "first"
        assert (await store.get(second)).model == "second"
        proxy.cuts_left = 2
        with pytest.raises(StoreUnavailableError, match="Connection closed by server"):
            await store.put(mask_of(noise_labels(4), model="lost"))
        assert proxy.cut == 3
        await store.close()
        await proxy.close()

    asyncio.run(scenario())
    client = redis_server.client()
    sizes = [len(client.get(key) or b"") for key in client.scan_iter("segserve:mask:*")]
    # Three masks, the lost one too (Redis ran its put twice): each counted once.
    assert len(sizes) == 3 and int(client.get("segserve:mask-bytes") or 0) == sum(sizes)


def test_redis_errors_name_the_server_but_not_its_password() -> None:
    async def scenario() -> None:
        store = create_store("redis://user:s3cret@127.0.0.1:1/0", 1000, 10)  # nothing listens
        with pytest.raises(StoreUnavailableError) as failure:
            await store.check()
        assert "127.0.0.1:1" in str(failure.value) and "s3cret" not in str(failure.value)
        await store.close()

    asyncio.run(scenario())
    with pytest.raises(ValueError) as refused:
        create_store("postgres://user:s3cret@db/x", 1000, 10)
    assert "s3cret" not in str(refused.value)


def test_redis_password_from_the_setting(tmp_path: Path) -> None:
    """A Redis with requirepass (as deployed): the password setting opens it, none is refused
    with a 503 that does not show the password."""
    server = RedisProcess(tmp_path, password="r3dis-s3cret")
    server.start()
    try:

        async def scenario() -> None:
            store = create_store(server.url, 10_000_000, 60, password="r3dis-s3cret")
            mask_id = await store.put(mask_of(astronaut_labels()))
            assert (await store.get(mask_id)).model == "segformer-b0"
            await store.close()
            anonymous = create_store(server.url, 10_000_000, 60)
            with pytest.raises(StoreUnavailableError, match="refused the password") as refused:
                await anonymous.check()
            assert "s3cret" not in str(refused.value)
            await anonymous.close()

        asyncio.run(scenario())
    finally:
        server.stop()
