"""``cliplab serve``: a search service over a cliplab index (FastAPI) and its web page.

:class:`SearchService` is the service without HTTP (micro-batched encoding, search, CLIP4DM explanations,
thumbnails); :func:`create_app` puts HTTP around it. See ``docs/serve.md``. FastAPI, uvicorn and python-multipart
are the ``serve`` extra (``pip install 'cliplab[serve]'``)."""

from .batcher import MicroBatcher
from .images import ImageRejected, decode_upload
from .metrics import Metrics
from .service import RequestError, SearchService
from .settings import ServeSettings


def create_app(*args, **kwargs):
    """See :func:`cliplab.server.app.create_app` (imported on first use: FastAPI is an optional dependency)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app", "SearchService", "ServeSettings", "MicroBatcher", "Metrics", "RequestError",
           "ImageRejected", "decode_upload"]
