"""Connections and requests at once: a deadline for each request's head, and a limit on the
requests in progress that always lets the probes through.

uvicorn's own limit (``limit_concurrency``) counted idle connections and answered past it with a
plain-text 503 before any app code. A connection that has sent nothing has no timeout in uvicorn,
and one byte stops its keep-alive timer, so 64 sockets that never sent a request kept every
client out, ``/healthz`` and ``/v2/health/live`` included (a liveness probe would restart the
pod), for as long as they stayed open. Here a connection gets ``head_timeout_s`` to deliver each
request's head, from its opening or from the end of the previous answer, and is closed
otherwise; requests in progress beyond ``max_connections`` get the service's JSON 503 with
``Retry-After``, counted in ``segserve_rejected_total``, and the probes are always served.

A connection given up on is aborted, not closed: ``close()`` first flushes what is buffered,
which for a client that does not read is never, and the socket stayed the server's with the
answer's unsent tail. Each request's scope carries the abort (``ABORT``) for the answer's
deadline (``service/http/delivery.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service import errors
from service.http.errors import (
    error_response,
    failure_headers,
    protocol_error,
    record_failure,
    speaks_protocol,
    status_of,
)

# Cheap answers orchestrators and scrapers need most when the server is busiest.
PROBES = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"})
# Scope extension: drops the request's connection at once, whatever is left unsent.
ABORT = "segserve.abort"


def head_deadline_protocol(head_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request head has not arrived
    ``head_timeout_s`` after it opened or after its last answer."""

    class HeadDeadlineProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            app = self.app

            async def with_abort(scope: Scope, receive: Receive, send: Send) -> None:
                scope["extensions"] = {**scope.get("extensions", {}), ABORT: self.abort}
                await app(scope, receive, send)

            self.app = with_abort

        def abort(self) -> None:
            """Drop the connection now: uvicorn then sees the client gone (no close waiting on
            a client that does not read, no "returned without completing response")."""
            self.transport.abort()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request's cycle
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            waiting = self.cycle  # a new request replaces the cycle

            def expire() -> None:
                idle = waiting is None or waiting.response_complete
                if self.cycle is waiting and idle and not self.transport.is_closing():
                    # The last answer's tail still buffered: the client is not reading it.
                    if self.transport.get_write_buffer_size():
                        self.transport.abort()
                    else:
                        self.transport.close()

            self._head_timer = self.loop.call_later(head_timeout_s, expire)

    return HeadDeadlineProtocol


class RequestLimit:
    """At most ``limit`` requests in progress (probes not counted, never refused); the rest get
    503 with ``Retry-After`` in the body their route speaks."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            refusal = errors.OverloadedError(
                f"{self.in_progress} requests in progress, the limit "
                "(SEGSERVE_MAX_CONNECTIONS); retry shortly",
                "connections",
            )
            record_failure(Request(scope), refusal)
            status, code = status_of(refusal)
            headers = failure_headers(refusal)
            if speaks_protocol(scope["path"]):
                answer = protocol_error(status, str(refusal), headers)
            else:
                answer = error_response(status, code, str(refusal), headers)
            await answer(scope, receive, send)
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1
