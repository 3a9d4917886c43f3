"""The HTTP face of segserve: an app factory, and one router per feature.

| module | what |
| --- | --- |
| ``app.py`` | ``create_app``, the lifespan (load models, open the store), the page |
| ``state.py`` | ``Services`` (what routes use) and ``Lifecycle`` (draining) |
| ``schemas.py`` | typed request and response bodies |
| ``errors.py`` | the one table from typed failures to HTTP statuses, and the handlers |
| ``middleware.py`` | request counters and latency by route template; HEAD answered as GET |
| ``uploads.py`` | the request body, size-capped, and the image inside it |
| ``auth.py`` | the API key check |
| ``segment.py``, ``masks.py``, ``models.py``, ``health.py`` | the routers |
"""

from service.http.app import create_app

__all__ = ["create_app"]
