"""Who may call what: the API key and the browser origins.

The key (``X-API-Key`` or ``Authorization: Bearer``, compared in constant time) guards every call
that runs a model or reads what users sent: ``/segment``, ``/masks/*`` and the inference protocol's
``/v2/models/{name}/infer``. Open: the page and its static files, ``/models`` (the page lists
models before a key is typed) and the protocol's metadata (``/v2``, ``/v2/models/{name}``: the
same facts), ``/docs`` and ``/openapi.json``, and what probes and scrapers call without
credentials: ``/healthz``, ``/readyz``, ``/v2/health/*``, ``/v2/models/{name}/ready`` (KServe's
probes), ``/metrics`` (counts and latencies per model, nothing a user sent; keep it off a public
ingress). With ``SEGSERVE_REQUIRE_API_KEY`` a missing key stops the server at
start-up rather than leaving all of this open.

Browsers send ``Origin`` on cross-origin calls (and on same-origin POSTs): a request from another
origin is refused with 403 ``origin_not_allowed`` unless ``SEGSERVE_CORS_ORIGINS`` lists it, in
which case it gets the CORS headers (Starlette's ``CORSMiddleware``). Clients that are not browsers
send no ``Origin`` and are unaffected.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from fastapi import Depends, Request
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from service import errors
from service.http.errors import error_response, status_of
from service.http.state import services
from service.settings import Settings


async def check_api_key(request: Request) -> None:
    """401 unless the request carries the configured key (when one is configured). Async, so
    FastAPI runs it on the event loop instead of in a worker thread (it only compares bytes)."""
    key = services(request).settings.api_key
    if key is None:
        return
    given = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization", "")
    if given is None and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    expected = key.get_secret_value().encode()
    if given is None or not hmac.compare_digest(given.encode(), expected):
        raise errors.UnauthorizedError("missing or wrong API key (send X-API-Key)")


API_KEY = Depends(check_api_key)


def require_configured_key(settings: Settings) -> None:
    """Fail closed: refuse to build a server that was told a key is required but has none."""
    if settings.require_api_key and settings.api_key is None:
        raise ValueError(
            "SEGSERVE_REQUIRE_API_KEY is set but SEGSERVE_API_KEY is empty or missing: "
            "provide the key (in Kubernetes, the segserve-api-key Secret) or unset "
            "SEGSERVE_REQUIRE_API_KEY to serve without authentication"
        )


class OriginPolicy:
    """ASGI middleware: same-origin and Origin-less requests pass, listed origins get CORS
    headers, any other origin gets 403 before the app sees the request."""

    def __init__(self, app: ASGIApp, allowed_origins: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = frozenset(allowed_origins)
        self.cors = CORSMiddleware(
            app,
            allow_origins=sorted(self.allowed),
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type"],
            expose_headers=["Retry-After", "Server-Timing"],
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None or urlsplit(origin).netloc == headers.get("host"):
            await self.app(scope, receive, send)
        elif origin in self.allowed:
            await self.cors(scope, receive, send)
        else:
            refusal = errors.OriginNotAllowedError(
                f"cross-origin request from {origin!r} refused: "
                "SEGSERVE_CORS_ORIGINS does not list it"
            )
            status, code = status_of(refusal)
            await error_response(status, code, str(refusal))(scope, receive, send)
