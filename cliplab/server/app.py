"""The HTTP shell over :class:`~cliplab.server.service.SearchService` (FastAPI): JSON endpoints, thumbnails,
Prometheus metrics and the search page. Every refusal is ``{"detail": "<one line>"}`` with a fitting status."""

import contextlib
import logging
from importlib import resources
from typing import Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..version import __version__
from .guard import Guard
from .images import ImageRejected, decode_upload
from .service import RequestError, SearchService
from .settings import ServeSettings

log = logging.getLogger("cliplab.server")

STATIC = resources.files("cliplab.server") / "static"


def _one_line_validation(exc) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request"


def create_app(service: SearchService | str, *, settings: ServeSettings | None = None, model=None):
    """A FastAPI app serving ``service`` (or an index path, opened with ``model`` and ``settings``)."""
    if not isinstance(service, SearchService):
        service = SearchService(service, model=model, settings=settings)
    s = service.settings
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="cliplab search", version=__version__, lifespan=lifespan,
                  description="Text and image search over a cliplab index, with per-word explanations (CLIP4DM).")
    app.state.service = service
    app.add_middleware(Guard, metrics=service.metrics, max_body=s.max_upload_bytes, deadline_s=s.timeout_s + 5)

    @app.exception_handler(RequestError)
    @app.exception_handler(ImageRejected)
    async def refused(request: Request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _one_line_validation(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    async def read_image(upload: UploadFile):
        data = await upload.read()
        return await run_in_threadpool(decode_upload, data, max_pixels=s.max_image_pixels)

    @app.get("/health", summary="Liveness and what is served")
    def health() -> dict[str, Any]:
        return service.health()

    @app.get("/api/search", summary="Text-to-image (or text-to-text) search")
    def search_text(q: str = Query("", description="the query text"),
                    k: int = Query(10, description=f"number of hits, 1..{s.k_max}")) -> dict[str, Any]:
        return service.search_text(q, k)

    @app.post("/api/search", summary="Image-to-image (or image-to-text) search with an uploaded image")
    async def search_image(image: UploadFile = File(..., description="the query image"),
                           k: int = Form(10), exclude_self: bool = Form(False)) -> dict[str, Any]:
        img = await read_image(image)
        return await run_in_threadpool(service.search_image, img, k, exclude_self=exclude_self)

    @app.post("/api/embed", summary='Embed texts (JSON {"texts": [...]}) or one image (multipart field "image")')
    async def embed(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise RequestError(422, 'send the image as the multipart file field "image"')
            img = await read_image(upload)
            return await run_in_threadpool(service.embed_image, img)
        try:
            body = await request.json()
        except Exception:
            raise RequestError(422, 'send JSON {"texts": [...]} or a multipart image') from None
        if not isinstance(body, dict) or "texts" not in body:
            raise RequestError(422, 'send JSON {"texts": [...]} or a multipart image')
        return await run_in_threadpool(service.embed_texts, body["texts"])

    @app.get("/api/explain", summary="Per-word attribution of a query against one hit (CLIP4DM)")
    def explain(q: str = Query(""), id: str = Query(..., description="the hit's id")) -> dict[str, Any]:
        return service.explain(q, id)

    @app.get("/thumb/{thumb_id:path}", summary="Thumbnail of an indexed image (ids in the index only)")
    def thumb(thumb_id: str):
        return Response(service.thumbnail(thumb_id), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    return app
