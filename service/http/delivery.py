"""Each request's memory hold, kept until its answer has been handed to the socket.

An answer was written whole into uvicorn's transport buffer, and its request's hold released,
as the route returned: a client that did not read kept its answer in the process (69 MiB for a
B0 probabilities answer), outside ``SEGSERVE_MAX_INFLIGHT_BYTES``, for as long as it liked. Here
the request's ``Holding`` lives as long as the ASGI call (routes take it with
``request_holding``), and a large body goes out in pieces: uvicorn waits for the socket to drain
before each one, so its buffer stays within about a piece. The body stays held whole until its
last piece is handed over, since it is in memory until then.

Every message of an answer is sent within ``timeout_s`` of its start: small ones wait for the
socket to drain too, and a client that pipelined requests and read nothing kept one in progress,
its hold and its request slot, forever. Past the deadline the connection is aborted (the
protocol's ``ABORT``; closing would wait on the client to take the buffered tail) and the hold
released.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.admission import Holding
from service.http.connections import ABORT

log = logging.getLogger("segserve.http")
PIECE = 256 * 1024  # bytes per write once the socket has drained
ANSWER_DROPPED = "answer_dropped"  # request state: the client did not take its answer in time


def request_holding(request: Request) -> Holding:
    """The request's hold on the in-flight budget (``AnswerDelivery``)."""
    held: Holding = request.state.holding
    return held


class AnswerDelivery:
    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        admission = scope["app"].state.services.admission
        with admission.request() as held:
            scope.setdefault("state", {})["holding"] = held
            deadline: float | None = None
            abandoned = False

            async def deliver(message: Message) -> None:
                nonlocal abandoned, deadline
                if abandoned:
                    return
                if deadline is None:  # the answer starts
                    deadline = asyncio.get_running_loop().time() + self.timeout_s
                body = message.get("body", b"")
                try:
                    async with asyncio.timeout_at(deadline):
                        if message["type"] != "http.response.body" or len(body) <= PIECE:
                            await send(message)
                            return
                        # Shrinking only: the answer, within what was held.
                        held.hold(min(held.bytes, len(body)), "the answer")
                        view, more = memoryview(body), message.get("more_body", False)
                        for start in range(0, len(view), PIECE):
                            end = start + PIECE
                            await send(
                                {
                                    "type": "http.response.body",
                                    "body": view[start:end],
                                    "more_body": more or end < len(view),
                                }
                            )
                except TimeoutError:
                    abandoned = True
                    scope["state"][ANSWER_DROPPED] = True  # counted as 499, not its status
                    abort = scope.get("extensions", {}).get(ABORT)
                    if abort is not None:
                        abort()
                        await asyncio.sleep(0)  # uvicorn learns of the loss before the app ends
                    log.info(
                        "%s %s: the client did not take its answer within %g s; connection dropped",
                        scope["method"],
                        scope["path"],
                        self.timeout_s,
                    )

            await self.app(scope, receive, deliver)
