"""The one table from typed failures (``service/errors.py``) to HTTP statuses, and the handlers
that answer every failure as a JSON ``ErrorBody``."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors
from service.http.schemas import ErrorBody, ProtocolError
from service.metrics import REJECTED

log = logging.getLogger("segserve.http")

# The one table from typed failures to HTTP statuses (and the short code clients can switch on).
ERROR_STATUS: dict[type[errors.SegserveError], tuple[int, str]] = {
    errors.UnsupportedMediaError: (415, "unsupported_media"),
    errors.InvalidImageError: (400, "invalid_image"),
    errors.MalformedRequestError: (400, "malformed_request"),
    errors.PayloadTooLargeError: (413, "payload_too_large"),
    errors.UnknownModelError: (404, "unknown_model"),
    errors.InvalidParameterError: (422, "invalid_parameter"),
    errors.MaskNotFoundError: (404, "mask_not_found"),
    errors.OverloadedError: (503, "overloaded"),
    errors.StoreUnavailableError: (503, "store_unavailable"),
    errors.InferenceTimeoutError: (504, "inference_timeout"),
    errors.UnauthorizedError: (401, "unauthorized"),
    errors.RequestTimeoutError: (408, "request_timeout"),
    errors.ClientClosedError: (499, "client_closed_request"),
    errors.OriginNotAllowedError: (403, "origin_not_allowed"),
}

# OpenAPI: every status a route may answer with an ErrorBody.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status, _ in set(ERROR_STATUS.values())
}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=code, message=message).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def protocol_error(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ProtocolError(error=message).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def speaks_protocol(path: str) -> bool:
    """Paths under ``/v2`` answer the Open Inference Protocol's error body, matched or not."""
    return path == "/v2" or path.startswith("/v2/")


def status_of(exc: errors.SegserveError) -> tuple[int, str]:
    return next((v for cls, v in ERROR_STATUS.items() if isinstance(exc, cls)), (500, "internal"))


def record_failure(request: Request, exc: errors.SegserveError) -> None:
    """What a failure leaves beside its answer: a log line for a client that went away (nobody
    reads the answer), a count of refused work by reason."""
    if isinstance(exc, errors.ClientClosedError):
        log.info("%s %s: %s", request.method, request.url.path, exc)
    if isinstance(exc, errors.OverloadedError):
        REJECTED.labels(getattr(request.state, "model", ""), exc.reason).inc()


def failure_headers(exc: errors.SegserveError) -> dict[str, str] | None:
    """What a client needs beside the status: when to retry, how to authenticate."""
    if isinstance(exc, errors.OverloadedError):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    if isinstance(exc, errors.StoreUnavailableError):
        return {"Retry-After": "1"}
    if isinstance(exc, errors.UnauthorizedError):
        return {"WWW-Authenticate": 'ApiKey header="X-API-Key"'}
    return None


def validation_message(exc: RequestValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.SegserveError)
    async def typed_failure(request: Request, exc: errors.SegserveError) -> Response:
        status, code = status_of(exc)
        record_failure(request, exc)
        return error_response(status, code, str(exc), failure_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return error_response(422, "invalid_parameter", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        if speaks_protocol(request.url.path):
            message = f"{exc.detail}: {request.method} {request.url.path}"
            return protocol_error(exc.status_code, message, headers)
        return error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal server error (see the server log)")
