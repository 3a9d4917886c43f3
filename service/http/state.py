"""What routes share: the services container and the draining state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from service import errors
from service.http.admission import ByteAdmission
from service.manager import ModelManager
from service.settings import Settings
from service.store import MaskStore

T = TypeVar("T")


class Lifecycle:
    """Counts in-flight requests that do work and refuses new ones once draining has begun."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin_drain(self) -> None:
        self.draining = True

    @contextmanager
    def track(self) -> Iterator[None]:
        if self.draining:
            raise errors.OverloadedError(
                "server is shutting down; retry on another replica", "draining"
            )
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True when every in-flight request finished within ``timeout_s``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


@dataclass
class Services:
    settings: Settings
    manager: ModelManager
    store: MaskStore
    pool: ThreadPoolExecutor
    lifecycle: Lifecycle
    admission: ByteAdmission

    async def in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking NumPy/Pillow work off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args))


def services(request: Request) -> Services:
    """The app's services."""
    found: Services = request.app.state.services
    return found


async def _services_dependency(request: Request) -> Services:
    """``services`` as a dependency. Async, so FastAPI calls it on the event loop: a plain ``def``
    dependency is run in a worker thread, a thread hop on every request."""
    return services(request)


ServicesDep = Annotated[Services, Depends(_services_dependency)]
