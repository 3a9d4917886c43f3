"""Request metrics, and HEAD as GET, as ASGI middleware."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ClientClosedError
from service.http.delivery import ANSWER_DROPPED
from service.http.errors import ERROR_STATUS
from service.metrics import REQUEST_LATENCY, REQUESTS


class RequestMetrics:
    """Count and time every HTTP request by model, route template and status.

    The route template (not the raw path) keeps mask ids out of the label set; routes put the
    model they resolved in ``request.state.model``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", None) or "unmatched"
            state = scope.get("state", {})
            if state.get(ANSWER_DROPPED):  # its status was sent, its answer never taken
                status, _ = ERROR_STATUS[ClientClosedError]
            model = state.get("model", "")
            REQUESTS.labels(model, endpoint, str(status)).inc()
            REQUEST_LATENCY.labels(model, endpoint).observe(time.perf_counter() - started)


class HeadAsGet:
    """Answer HEAD as GET without the body (RFC 9110 9.3.2): the same status and headers,
    ``Content-Length`` included. Load balancers and uptime checks probe ``/healthz`` and
    ``/readyz`` with HEAD, and FastAPI's routes take only the methods they name (HEAD was a 405
    on every route). A HEAD of a POST-only route stays a 405. The route the router matched is
    copied back into the HEAD's scope, so ``RequestMetrics`` counts it under its route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, send_headers_only)
        finally:
            if "route" in as_get:
                scope["route"] = as_get["route"]
