"""The API key: ``X-API-Key`` or ``Authorization: Bearer``, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from service import errors
from service.http.state import services


def check_api_key(request: Request) -> None:
    """401 unless the request carries the configured key (when one is configured)."""
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
