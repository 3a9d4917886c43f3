"""Admission by bytes: what the requests in progress hold in memory, against one limit.

Queue slots alone do not bound memory: eight 40-megapixel uploads being read, decoded and
waiting for the model take gigabytes while the queue looks short. Each ``/segment`` request holds
a count of bytes that follows it (the body as it arrives, then the decoded image, then its plan's
estimated peak with its answer, ``planning.request_bytes``); one that would take the total over
the limit is refused at once with 503 and ``Retry-After``, and one that could never fit with 413.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service import errors
from service.metrics import INFLIGHT_BYTES


def _size(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.0f} MiB" if nbytes >= 1 << 20 else f"{nbytes} bytes"


class ByteAdmission:
    """Bytes held by requests in progress (one event loop: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @contextmanager
    def request(self) -> Iterator[Holding]:
        """A request's holding, released when the block ends however it ends."""
        holding = Holding(self)
        try:
            yield holding
        finally:
            self.held -= holding.bytes
            INFLIGHT_BYTES.set(self.held)


class Holding:
    """What one request holds; ``hold`` replaces it, refusing growth past the limit."""

    def __init__(self, admission: ByteAdmission) -> None:
        self._admission = admission
        self.bytes = 0

    def hold(self, nbytes: int, what: str) -> None:
        admission = self._admission
        extra = nbytes - self.bytes
        if extra > 0 and nbytes > admission.limit:
            raise errors.PayloadTooLargeError(
                f"{what} needs {_size(nbytes)}, more than the {_size(admission.limit)} all "
                "requests in progress may hold (SEGSERVE_MAX_INFLIGHT_BYTES)"
            )
        if extra > 0 and admission.held + extra > admission.limit:
            raise errors.OverloadedError(
                f"{what} needs {_size(nbytes)} and other requests in progress hold "
                f"{_size(admission.held - self.bytes)} of {_size(admission.limit)}; retry shortly",
                "memory",
            )
        admission.held += extra
        self.bytes = nbytes
        INFLIGHT_BYTES.set(admission.held)

    def grow(self, nbytes: int, what: str) -> None:
        self.hold(self.bytes + nbytes, what)
