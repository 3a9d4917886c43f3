"""Typed failures of the serving path. ``api.py`` maps each class to one HTTP status in one table;
the engine and the image decoder raise these and nothing HTTP-specific."""

from __future__ import annotations

from typing import Literal


class SegserveError(Exception):
    """Base class: the message is shown to the client, so it must name the problem plainly."""


class UnsupportedMediaError(SegserveError):
    """Not an image, or a format we do not decode (415)."""


class InvalidImageError(SegserveError):
    """Empty, truncated or corrupt image data (400)."""


class PayloadTooLargeError(SegserveError):
    """Body over the byte limit, or more pixels than allowed / decompression bomb (413)."""


class UnknownModelError(SegserveError):
    """No loaded bundle has this name (404)."""


class MalformedRequestError(SegserveError):
    """A request body that does not parse: bad JSON, binary sizes that do not add up (400)."""


class InvalidParameterError(SegserveError):
    """A request option out of range: zero stride, crop too large, bad scales (422)."""


class MaskNotFoundError(SegserveError):
    """Unknown or expired mask id (404)."""


RefusalReason = Literal["queue_full", "memory", "connections", "draining", "not_ready", "stopped"]


class OverloadedError(SegserveError):
    """Work refused for now (503 with Retry-After): the queue or the request memory budget is
    full, the server is draining, or models are not running. ``reason`` labels
    ``segserve_rejected_total``."""

    def __init__(self, message: str, reason: RefusalReason, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class StoreUnavailableError(SegserveError):
    """The mask store (e.g. Redis) is down or full (503)."""


class InferenceTimeoutError(SegserveError):
    """Inference did not finish within the time limit (504)."""


class UnauthorizedError(SegserveError):
    """Missing or wrong API key (401)."""


class RequestTimeoutError(SegserveError):
    """The request body did not arrive within the time allowed (408)."""


class ClientClosedError(SegserveError):
    """The client went away before the answer (499, nginx's "client closed request")."""


class OriginNotAllowedError(SegserveError):
    """A browser request from an origin ``SEGSERVE_CORS_ORIGINS`` does not list (403)."""
