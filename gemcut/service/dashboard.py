"""The web dashboard of the fine-tuning service: static pages under /dashboard that talk to the /v1 API.

    gemcut serve ...                       # then open http://127.0.0.1:8000/dashboard and sign in with a key
    install(app)                           # mount it on a FastAPI app (gemcut/service/app.py does)
    python -m pytest -q tests/test_service_dashboard.py     # end to end in headless Chromium

Routes (public: they hold no data; the page asks for an API key and sends it as a bearer header itself):
  GET /dashboard                 the page (gemcut/service/static/index.html; plain HTML + JS, no build step)
  GET /dashboard/static/{name}   its script, style, and the vendored Chart.js (a fixed list of files)

The key is kept in the browser's sessionStorage only (never localStorage, a cookie or a URL). The page's
Content-Security-Policy lets it load and call nothing but this server, so no request leaves the machine.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

STATIC = Path(__file__).parent / "static"
PREFIX = "/dashboard"

# A fixed list: no path from a request reaches the file system.
STATIC_FILES = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    "vendor/chart.umd.min.js": "text/javascript",
    "vendor/LICENSE.md": "text/plain; charset=utf-8",
}

# Scripts, styles, pictures and calls from this server only. Inline styles are allowed because the eval report
# (gemcut/eval/report.py: an inline <style>, data: pictures) is shown in a sandboxed srcdoc frame, which takes
# its policy from this page; scripts stay 'self' only, and the frame's sandbox runs none.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; connect-src 'self'; frame-src 'self'; form-action 'none'; "
                           "base-uri 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

router = APIRouter(prefix=PREFIX, tags=["dashboard"])


def install(app: FastAPI) -> None:
    """Mount the dashboard on `app` and mark its paths public for gemcut/serve/auth.py (the API stays protected)."""
    app.state.public_prefixes = (*getattr(app.state, "public_prefixes", ()), PREFIX)
    app.include_router(router)


@router.get("", response_class=HTMLResponse, include_in_schema=False)
@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers=PAGE_HEADERS)


@router.get("/static/{name:path}", include_in_schema=False)
def static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise HTTPException(404, "no such file")
    return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"X-Content-Type-Options": "nosniff"})
