"""Where label maps wait between ``POST /segment`` and the renderings fetched by mask id.

Two backends behind one small interface: process memory (the default, one replica) and Redis
(``redis://...``, shared by every replica so a mask posted to one is fetchable from any other).
Both hold the same self-describing blob: a header naming the mask id, model, palette version, dtype
and shape, then the zstd-compressed labels and the optional JPEG. Any replica can therefore render
a mask without knowing which replica made it, and ``get`` checks that the blob it read carries the
id it asked for, so a mask is never handed to the wrong caller.

Both backends are bounded by total stored bytes (oldest evicted first) and by a time to live:
memory expires entries when it is touched; Redis expires keys itself (``PX``) and one Lua script
does the byte accounting atomically on every put, so no sweeper of ours runs anywhere. The script
also evicts our oldest masks when Redis itself nears ``maxmemory``, so a full Redis keeps
accepting masks. A Redis that is down, slow, or full of other data raises
``StoreUnavailableError`` (HTTP 503); the client reconnects by itself once Redis is back.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import redis.asyncio as aioredis
import zstandard
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, OutOfMemoryError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from service.errors import MaskNotFoundError, PayloadTooLargeError, StoreUnavailableError

_MAGIC = b"SEGMASK1"
_HEADER_LENGTH = struct.Struct("<I")
_LABEL_DTYPES: dict[str, np.dtype] = {"uint8": np.dtype("uint8"), "uint16": np.dtype("<u2")}
_MASK_ID = re.compile(r"^[A-Za-z0-9_-]{22,64}$")
# Labels are compressed with zstd level 1: on a 512x512 label map it took 0.25 ms for 25 KB where
# zlib level 3 (the codec before) took 1.4 ms for 30 KB (docs/deploy.md). Compression sits on the
# /segment path; the frame checksum catches damage as zlib's did. Records written by zlib
# replicas (no "codec" in the header) still read.
_ZSTD_LEVEL = 1


@dataclass(frozen=True)
class StoredMask:
    """One segmentation result as the renderers need it, whichever replica made it."""

    model: str
    labels: np.ndarray  # (H, W) uint8 or uint16
    palette_version: str  # short hash of the palette the mask was made with
    image_jpeg: bytes | None  # the photo (JPEG; PNG past JPEG's 65 500 px side), for overlays


class MaskStore(Protocol):
    async def put(self, mask: StoredMask) -> str:
        """Store ``mask``; return a new unguessable mask id."""
        ...

    async def get(self, mask_id: str) -> StoredMask:
        """The mask; ``MaskNotFoundError`` when unknown or expired, ``StoreUnavailableError``
        when the backend cannot answer."""
        ...

    async def check(self) -> None:
        """Raise ``StoreUnavailableError`` when the backend is down (used by ``/readyz``)."""
        ...

    async def close(self) -> None: ...


def new_mask_id() -> str:
    """128 random bits, URL-safe: ids are capabilities, so they must not be guessable."""
    return secrets.token_urlsafe(16)


def encode_mask(mask_id: str, mask: StoredMask) -> bytes:
    """Serialise a mask into the blob both backends store (labels compressed)."""
    labels = np.asarray(mask.labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    dtype_name = labels.dtype.name
    if dtype_name not in _LABEL_DTYPES:
        raise ValueError(f"labels must be uint8 or uint16, got {labels.dtype}")
    packed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True).compress(
        np.ascontiguousarray(labels, dtype=_LABEL_DTYPES[dtype_name]).tobytes()
    )
    image = mask.image_jpeg
    header = json.dumps(
        {
            "id": mask_id,
            "model": mask.model,
            "palette_version": mask.palette_version,
            "dtype": dtype_name,
            "shape": list(labels.shape),
            "codec": "zstd",
            "labels_bytes": len(packed),
            "image_bytes": None if image is None else len(image),
        },
        separators=(",", ":"),
    ).encode()
    return b"".join((_MAGIC, _HEADER_LENGTH.pack(len(header)), header, packed, image or b""))


def decode_mask(mask_id: str, blob: bytes) -> StoredMask:
    """Inverse of ``encode_mask``; refuses a blob that is damaged or belongs to another id."""
    try:
        if not blob.startswith(_MAGIC):
            raise ValueError("bad magic")
        offset = len(_MAGIC)
        (header_length,) = _HEADER_LENGTH.unpack_from(blob, offset)
        offset += _HEADER_LENGTH.size
        header = json.loads(blob[offset : offset + header_length])
        offset += header_length
        if header["id"] != mask_id:
            raise ValueError(f"blob belongs to mask {header['id']!r}")
        dtype = _LABEL_DTYPES[header["dtype"]]
        height, width = (int(v) for v in header["shape"])
        expected = height * width * dtype.itemsize
        labels_end = offset + int(header["labels_bytes"])
        packed = blob[offset:labels_end]
        if header.get("codec") == "zstd":
            raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=expected)
        else:
            raw = zlib.decompress(packed)
        if len(raw) != expected:
            raise ValueError("label bytes do not match the recorded shape")
        labels = np.frombuffer(bytearray(raw), dtype=dtype).reshape(height, width)
        image_bytes = header["image_bytes"]
        image = None if image_bytes is None else bytes(blob[labels_end : labels_end + image_bytes])
        if image is not None and len(image) != image_bytes:
            raise ValueError("truncated image")
        return StoredMask(
            model=str(header["model"]),
            labels=labels,
            palette_version=str(header["palette_version"]),
            image_jpeg=image,
        )
    except (ValueError, KeyError, TypeError, struct.error, zlib.error, zstandard.ZstdError) as exc:
        raise StoreUnavailableError(f"mask store returned a damaged record: {exc}") from exc


def _check_limits(max_bytes: int, ttl_s: float) -> None:
    if max_bytes < 1:
        raise ValueError(f"mask store max_bytes must be positive, got {max_bytes}")
    if ttl_s <= 0:
        raise ValueError(f"mask store ttl_s must be positive, got {ttl_s}")


def _too_large(size: int, max_bytes: int) -> PayloadTooLargeError:
    """Never storable, so not the retryable 503 of a store that is down."""
    return PayloadTooLargeError(
        f"mask needs {size} bytes, more than the whole mask store ({max_bytes} bytes, "
        "SEGSERVE_MASK_STORE_MAX_BYTES): ask for output=labels or png, which are not stored"
    )


class MemoryMaskStore:
    """In-process store for a single replica: insertion-ordered, so oldest is also first to expire
    (every entry has the same TTL) and eviction is a walk from the front."""

    def __init__(
        self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        _check_limits(max_bytes, ttl_s)
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._total_bytes = 0

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def put(self, mask: StoredMask) -> str:
        mask_id = new_mask_id()
        blob = await asyncio.to_thread(encode_mask, mask_id, mask)
        if len(blob) > self.max_bytes:
            raise _too_large(len(blob), self.max_bytes)
        now = self._clock()
        self._drop_expired(now)
        while self._total_bytes + len(blob) > self.max_bytes:
            self._pop_oldest()
        self._entries[mask_id] = (now + self.ttl_s, blob)
        self._total_bytes += len(blob)
        return mask_id

    async def get(self, mask_id: str) -> StoredMask:
        self._drop_expired(self._clock())
        entry = self._entries.get(mask_id)
        if entry is None:
            raise MaskNotFoundError(f"mask {mask_id!r} is unknown or expired")
        return await asyncio.to_thread(decode_mask, mask_id, entry[1])

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._total_bytes = 0

    def _drop_expired(self, now: float) -> None:
        while self._entries:
            expires_at, _ = next(iter(self._entries.values()))
            if expires_at > now:
                return
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        _, (_, blob) = self._entries.popitem(last=False)
        self._total_bytes -= len(blob)


# One atomic step per put. The index is a sorted set of "id size" members scored by insertion time
# in microseconds (Redis' clock, shared by all replicas), kept strictly increasing so that puts
# within one clock tick still evict oldest first (equal scores would order by the random id); the
# total counts the bytes of indexed masks. Entries older than the TTL have already been expired by
# Redis itself and are only forgotten here; then the oldest live masks are deleted until the new
# one fits both our byte budget and Redis' own maxmemory (read from INFO, with headroom for the
# allocator), so a Redis at its limit makes room instead of refusing every put under
# ``noeviction``. ``allow-oom`` lets the script run at the limit; it writes only once there is room
# and answers an OOM error when Redis is full of data that is not ours. A put retried after a lost
# reply finds its member already indexed and changes nothing. Index and total expire with the
# newest mask, so an idle store leaves nothing behind.
_PUT_SCRIPT = """#!lua flags=allow-oom
local index, total_key, mask_key = KEYS[1], KEYS[2], KEYS[3]
local blob, ttl_ms, max_bytes, member = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local size = string.len(blob)
if redis.call('ZSCORE', index, member) then
  return tonumber(redis.call('GET', total_key) or '0')
end
local clock = redis.call('TIME')
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local expired_before = now_us - ttl_ms * 1000
local newest = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
local score = now_us
if #newest == 2 and tonumber(newest[2]) >= score then
  score = tonumber(newest[2]) + 1
end
local total = tonumber(redis.call('GET', total_key) or '0')
local function size_of(entry)
  return tonumber(string.match(entry, ' (%d+)$'))
end
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', expired_before)) do
  total = total - size_of(entry)
end
redis.call('ZREMRANGEBYSCORE', index, '-inf', expired_before)
local function memory_short()
  local info = redis.call('INFO', 'memory')
  local limit = tonumber(string.match(info, 'maxmemory:(%d+)'))
  if limit == 0 then
    return false
  end
  local used = tonumber(string.match(info, 'used_memory:(%d+)'))
  used = used - tonumber(string.match(info, 'mem_not_counted_for_evict:(%d+)') or '0')
  return used + size + math.floor(size / 4) + 65536 > limit
end
local function evict_oldest()
  local oldest = redis.call('ZPOPMIN', index)
  if #oldest == 0 then
    return false
  end
  total = total - size_of(oldest[1])
  redis.call('DEL', ARGV[5] .. string.match(oldest[1], '^(%S+) '))
  return true
end
while total + size > max_bytes do
  if not evict_oldest() then
    total = 0
    break
  end
end
while memory_short() do
  if not evict_oldest() then
    redis.call('SET', total_key, math.max(total, 0), 'PX', ttl_ms)
    return redis.error_reply('OOM Redis is at maxmemory with no masks left to evict')
  end
end
redis.call('SET', mask_key, blob, 'PX', ttl_ms)
redis.call('ZADD', index, score, member)
redis.call('SET', total_key, total + size, 'PX', ttl_ms)
redis.call('PEXPIRE', index, ttl_ms)
return total + size
"""


class RedisMaskStore:
    """Shared store for N replicas. Keys live under ``prefix``; one standalone Redis (or a primary)
    is expected, since the put script touches the index and the mask key together."""

    def __init__(
        self,
        url: str,
        max_bytes: int,
        ttl_s: float,
        prefix: str = "segserve:",
        timeout_s: float = 2.0,
        password: str | None = None,
    ) -> None:
        _check_limits(max_bytes, ttl_s)
        self.max_bytes = max_bytes
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self._mask_prefix = f"{prefix}mask:"
        self._index_key = f"{prefix}mask-index"
        self._total_key = f"{prefix}mask-bytes"
        # redis-py replaces the pooled connections it sees closed by a Redis restart; a command
        # cut off by one (closed after the pool's check, or its reply lost) is retried once on a
        # new connection, so the store heals by itself. The retry is explicit: connections made
        # from a URL retry nothing by default. Only connection errors are retried (a timeout
        # would double the wait); the put script tolerates being run twice.
        self._client = aioredis.from_url(
            url,
            password=password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._put_script = self._client.register_script(_PUT_SCRIPT)
        self._url = _without_password(url)

    async def put(self, mask: StoredMask) -> str:
        mask_id = new_mask_id()
        blob = await asyncio.to_thread(encode_mask, mask_id, mask)
        if len(blob) > self.max_bytes:
            raise _too_large(len(blob), self.max_bytes)
        try:
            await self._put_script(
                keys=[self._index_key, self._total_key, self._mask_prefix + mask_id],
                args=[
                    blob,
                    self.ttl_ms,
                    self.max_bytes,
                    f"{mask_id} {len(blob)}",
                    self._mask_prefix,
                ],
            )
        except RedisError as exc:
            raise self._unavailable("store", exc) from exc
        return mask_id

    async def get(self, mask_id: str) -> StoredMask:
        if not _MASK_ID.match(mask_id):
            raise MaskNotFoundError(f"mask {mask_id!r} is unknown or expired")
        try:
            blob = await self._client.get(self._mask_prefix + mask_id)
        except RedisError as exc:
            raise self._unavailable("read", exc) from exc
        if blob is None:
            raise MaskNotFoundError(f"mask {mask_id!r} is unknown or expired")
        if not isinstance(blob, bytes):
            raise StoreUnavailableError("mask store returned text; use a client without decoding")
        return await asyncio.to_thread(decode_mask, mask_id, blob)

    async def check(self) -> None:
        try:
            await self._client.ping()
        except RedisError as exc:
            raise self._unavailable("reach", exc) from exc

    async def close(self) -> None:
        await self._client.aclose()

    def _unavailable(self, action: str, exc: RedisError) -> StoreUnavailableError:
        if isinstance(exc, OutOfMemoryError):
            reason = "is out of memory"
        elif isinstance(exc, AuthenticationError):
            reason = "refused the password (SEGSERVE_MASK_STORE_PASSWORD or the URL's)"
        else:
            reason = f"failed: {exc}"
        return StoreUnavailableError(f"cannot {action} mask: Redis at {self._url} {reason}")


def _without_password(url: str) -> str:
    """The URL for messages and logs, credentials removed."""
    return re.sub(r"//[^@/]*@", "//", url)


def create_store(url: str, max_bytes: int, ttl_s: float, password: str | None = None) -> MaskStore:
    """``"memory"`` → this process; ``redis://``, ``rediss://`` or ``unix://`` → a shared Redis
    (``password`` for a URL without one, e.g. from a Kubernetes Secret)."""
    if url == "memory":
        return MemoryMaskStore(max_bytes, ttl_s)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisMaskStore(url, max_bytes, ttl_s, password=password)
    raise ValueError(
        f"mask store must be 'memory' or a redis:// URL, got {_without_password(url)!r}"
    )
