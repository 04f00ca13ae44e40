"""The search page and its JSON API over a ``SearchService`` (FastAPI; served by uvicorn).

    GET  /                 the page: upload an image or sketch, draw a sketch, or type a text
    GET  /api/info         the gallery, its spaces (exact or FAISS) and the modes served
    POST /api/search       multipart (fields: mode, k, text, file) or JSON
                           ({"mode": "text", "text": "...", "k": 10} or {"mode": "sketch", "image": "<base64 or
                           data: URL>"}); -> {"results": [{"rank", "id", "score", "url"}, ...], "took_ms", ...}
    GET  /files/{row}      the gallery file of a row (from the store's manifest): thumbnails and links

Files are served by row number only, from the list the gallery built from its manifest, so no
request names a path. No Prefect or MLflow here: the app starts in the time its encoders load.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from projection.search.service import MODES, SearchService

PAGE = Path(__file__).with_name("page.html")


def create_app(service: SearchService) -> FastAPI:
    app = FastAPI(title="xmodal search", docs_url="/api/docs", redoc_url=None)
    page = PAGE.read_text()

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict:
        return service.info()

    @app.get("/files/{row}")
    def files(row: int):
        if not 0 <= row < len(service.gallery) or service.gallery.files[row] is None:
            raise HTTPException(404, f"gallery row {row} has no file")
        path = service.gallery.files[row]
        if not path.is_file():
            raise HTTPException(404, f"gallery file {path.name} of row {row} is missing on disk")
        return FileResponse(path)

    @app.post("/api/search")
    async def search(request: Request):
        try:
            mode, k, text, image = await _parse(request)
            out = service.query(mode, text=text, image=image, k=k)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        for r in out["results"]:
            r["url"] = f"/files/{r['row']}" if r.pop("has_file") else None
        return out

    return app


async def _parse(request: Request) -> tuple[str, int, str | None, bytes | None]:
    """(mode, k, text, image bytes) from a multipart form or a JSON body; ValueError in one line."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise ValueError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ValueError("the JSON body must be an object: {\"mode\": ..., \"text\" | \"image\": ..., \"k\": ...}")
        text, image = body.get("text"), _b64(body.get("image"))
        mode, k = body.get("mode"), body.get("k", 10)
    elif ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        text, upload = form.get("text"), form.get("file")
        image = await upload.read() if upload is not None and hasattr(upload, "read") else None
        mode, k = form.get("mode"), form.get("k", 10)
    else:
        raise ValueError(f"send multipart/form-data or application/json, not {ctype or 'no content type'!r}")
    mode = mode or ("text" if text and not image else "image")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise ValueError(f"k must be an integer, not {k!r}") from None
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be between 1 and 1000, got {k}")
    return mode, k, (str(text) if text else None), image or None


def _b64(value) -> bytes | None:
    if not value:
        return None
    if not isinstance(value, str):
        raise ValueError("\"image\" must be a base64 string or a data: URL")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("\"image\" is not valid base64") from None


def serve(service: SearchService, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the app in this process (blocks): the service stays loaded between requests."""
    import uvicorn

    uvicorn.run(create_app(service), host=host, port=port, log_level="info")
