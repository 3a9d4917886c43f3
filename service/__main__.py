"""``python -m service --host H --port P``: the server as the container runs it.

SIGTERM starts a graceful drain instead of uvicorn's immediate stop: ``/readyz`` and new
``/segment`` calls answer 503 at once (the load balancer moves on while the listener stays open),
in-flight requests get up to ``SEGSERVE_DRAIN_TIMEOUT_S`` to finish (and the listener stays open
for at least ``SEGSERVE_DRAIN_MIN_S``), then uvicorn closes
connections, the lifespan stops the engines, and the process exits 0. A second SIGTERM stops at
once with status 143 (128 + SIGTERM), abandoning what is in flight; SIGINT stops as uvicorn does.

Settings that cannot be served (a malformed ``SEGSERVE_*`` value, ``SEGSERVE_REQUIRE_API_KEY``
without a key) stop the process with exit status 2 and one line saying why. A model repository
that fails to load (missing, invalid bundle, unknown default model) stops it with exit status 1
after logging why, so an orchestrator shows the failure instead of a replica that never becomes
ready.

The image bakes the label kernel's Numba cache into ``/app/numba-cache``, but Numba only uses a
cache directory it can write to, and the root filesystem is read-only when deployed; so the baked
files are copied into ``NUMBA_CACHE_DIR`` (under ``/tmp``) before any model warms up, and the
kernel is loaded instead of compiled at every start.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from service.heap import heap
from service.http import create_app
from service.http.connections import head_deadline_protocol
from service.http.state import Services
from service.manager import ModelsState
from service.settings import Settings

log = logging.getLogger("segserve")
# Where the Dockerfile compiles the kernel: /app/numba-cache next to /app/service.
BAKED_NUMBA_CACHE = Path(__file__).resolve().parent.parent / "numba-cache"


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains the app before the usual shutdown."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: FastAPI,
        drain_timeout_s: float,
        drain_min_s: float = 0.0,
    ) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self.drain_min_s = drain_min_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._drain_requested = False
        self.load_failed = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def on_tick(self, counter: int) -> bool:
        services: Services | None = getattr(self.app.state, "services", None)
        if services is not None and services.manager.state is ModelsState.FAILED:
            self.load_failed = True
            return True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._loop is not None:
            if self._drain_requested:
                log.warning("second SIGTERM: stopping now, abandoning in-flight requests")
                logging.shutdown()
                os._exit(128 + signal.SIGTERM)
            # Not recorded in uvicorn's captured signals: that would re-raise SIGTERM after the
            # shutdown and turn a clean drain into exit status 143.
            self._drain_requested = True
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        minimum = asyncio.ensure_future(asyncio.sleep(self.drain_min_s))
        services: Services | None = getattr(self.app.state, "services", None)
        if services is not None:
            services.lifecycle.begin_drain()
            log.info(
                "SIGTERM: draining %d in-flight request(s), up to %.1f s",
                services.lifecycle.in_flight,
                self.drain_timeout_s,
            )
            if not await services.lifecycle.wait_idle(self.drain_timeout_s):
                log.warning(
                    "drain timeout: %d request(s) still running", services.lifecycle.in_flight
                )
        log.info("drain: in-flight done, holding %.1f s minimum", self.drain_min_s)
        await minimum
        self.should_exit = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    # Before anything starts a thread: glibc gives a thread its malloc arena at its first
    # allocation, so a limit of one arena set later (when the first model loads, in a pool
    # thread) leaves the batch threads on arenas of their own, whose freed 64 MiB heaps go back
    # to the kernel: a B0 server's forward page-faulted ~14000 times per request (service/heap.py).
    heap()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")

    try:
        settings = Settings()
        app = create_app(settings)
    except ValueError as exc:  # pydantic's ValidationError included
        print(f"segserve: refusing to start: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    if settings.api_key is None and not is_loopback(args.host):
        log.warning(
            "listening on %s:%d with no API key: anyone who reaches this port can use every "
            "model; set SEGSERVE_API_KEY (and SEGSERVE_REQUIRE_API_KEY=true to fail closed)",
            args.host,
            args.port,
        )
    seed_numba_cache()
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        # uvloop, pinned in requirements: less per request than asyncio's loop (docs/benchmarks.md).
        # The HTTP parser stays h11: with httptools, bytes past a request's Content-Length are
        # parsed as the next request and its 400 replaces the answer to the first. Each request's
        # head must arrive in time (service/http/connections.py).
        http=head_deadline_protocol(settings.head_timeout_s),
        loop="uvloop",
        # In-flight work already had the drain; connections then get a short grace to flush.
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
        # No limit_concurrency: it counted idle connections and refused /healthz past it in plain
        # text; the app limits requests in progress (SEGSERVE_MAX_CONNECTIONS, RequestLimit).
    )
    server = DrainingServer(config, app, settings.drain_timeout_s, settings.drain_min_s)
    server.run()
    if server.load_failed:
        sys.exit(1)


def one_line(error: ValueError) -> str:
    """Each bad setting as ``SEGSERVE_NAME: why``, joined on one line (pydantic's own text takes
    three lines a setting, the value included: a secret's too)."""
    if not isinstance(error, ValidationError):
        return str(error)
    return "; ".join(
        ("SEGSERVE_" + "__".join(str(part) for part in e["loc"]).upper() + ": " if e["loc"] else "")
        + e["msg"]
        for e in error.errors()
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def seed_numba_cache(baked: Path = BAKED_NUMBA_CACHE) -> None:
    """Copy the image's compiled kernels into the writable ``NUMBA_CACHE_DIR``, if both exist.
    Numba picks the cache directory when ``service.labelmap`` is imported but reads the files only
    at the first call (the engine's warm-up), so copying here, before the app starts, is in time."""
    target = os.environ.get("NUMBA_CACHE_DIR")
    if not target or not baked.is_dir() or Path(target).resolve() == baked.resolve():
        return
    try:
        shutil.copytree(baked, target, dirs_exist_ok=True)
    except OSError as exc:
        log.warning("Numba cache not copied (the kernel compiles at warm-up): %s", exc)


if __name__ == "__main__":
    main()
