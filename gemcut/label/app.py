"""The ranking page and its JSON API, as a FastAPI router mounted under /label.

    gemcut label [--db URL] [--port 8700] [--keys labelers.txt]     # standalone, on 127.0.0.1
    # or inside `gemcut serve`:  install(app, LabelStore(url))

Routes (all under /label):
  GET  /               the page (gemcut/label/static/index.html; plain HTML + JS, no build step)
  GET  /static/{file}  its script and style
  GET  /api/config     {"keys_required": bool}
  GET  /api/next       the prompt leased to this labeler now (its text, and its messages when it is a chat),
                       or {"done": true}
  POST /api/rank       {"prompt_id", "order": [completion ids, best first]}
  POST /api/skip       {"prompt_id"}
  POST /api/flag       {"prompt_id", "note"}
  GET  /api/progress   counts for the progress bar

The labeler is named by the `X-Labeler` header. When the app has labeler keys (`--keys`, lines of
`name:key`), the `X-Labeler-Key` header is required instead and the name comes from the key. A standalone
server answers only to its own Host names (gemcut/netguard.py), and one bound beyond loopback
(`--host`) requires keys: the page shows prompts and takes rankings.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from gemcut.errors import GemcutError
from gemcut.label.store import LabelError, LabelStore
from gemcut.netguard import install_host_check, is_loopback

STATIC = Path(__file__).parent / "static"
_STATIC_FILES = {"label.js": "text/javascript", "label.css": "text/css"}

router = APIRouter(prefix="/label", tags=["labeling"])


# Row ids are SQL integers: a larger number is a 422 naming the field, not an overflow in the database.
RowId = Annotated[int, Field(ge=1, le=2**63 - 1)]


class RankBody(BaseModel):
    prompt_id: RowId
    order: list[RowId] = Field(description="Every completion id of the prompt, best first.", max_length=1000)


class MarkBody(BaseModel):
    prompt_id: RowId
    note: str | None = Field(None, max_length=2000)


def install(app: FastAPI, store: LabelStore, keys: dict[str, str] | None = None) -> None:
    """Mount the ranking page on `app` over `store`; `keys` maps labeler name -> key when keys are required."""
    app.state.label_store = store
    app.state.label_keys = keys or None
    app.include_router(router)


def create_app(store: LabelStore, keys: dict[str, str] | None = None, *, host: str = "127.0.0.1",
               allowed_hosts: list[str] | tuple[str, ...] = ()) -> FastAPI:
    """A FastAPI app with only the ranking page (what `gemcut label` serves) for a server bound to `host`;
    `allowed_hosts` are further names it answers to."""
    if not is_loopback(host) and not keys:
        raise GemcutError(f"binding {host} puts the ranking page (prompts, rankings) beyond this machine: pass --keys FILE "
                          "(lines of name:key) so only your labelers get in, or leave --host at 127.0.0.1")
    app = FastAPI(title="gemcut labeling", docs_url=None, redoc_url=None)
    install(app, store, keys)
    install_host_check(app, host, allowed_hosts)
    app.add_api_route("/", lambda: RedirectResponse("/label/"), include_in_schema=False)
    return app


def read_keys(path: str | Path) -> dict[str, str]:
    """`name:key` per line (blank lines and # comments ignored) -> {name: key}."""
    keys: dict[str, str] = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        if not sep or not name.strip() or len(key.strip()) < 8:
            raise GemcutError(f"{path}:{i}: expected `name:key` with a key of at least 8 characters")
        keys[name.strip()] = key.strip()
    return keys


def _store(request: Request) -> LabelStore:
    store = getattr(request.app.state, "label_store", None)
    if store is None:  # mounted without install(): the default database
        store = request.app.state.label_store = LabelStore()
    return store


def _labeler(request: Request) -> str:
    keys = getattr(request.app.state, "label_keys", None)
    if keys:
        given = request.headers.get("x-labeler-key", "")
        for name, key in keys.items():
            if hmac.compare_digest(given.encode(), key.encode()):
                return name
        raise HTTPException(401, "unknown labeler key; ask the person running `gemcut label` for yours")
    name = request.headers.get("x-labeler", "").strip()
    if not name:
        raise HTTPException(400, "send your labeler name in the X-Labeler header (the page asks for it)")
    return name


def _call(fn, *args):
    try:
        return fn(*args)
    except LabelError as e:
        raise HTTPException(409, str(e)) from None


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
@router.get("", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


@router.get("/static/{name}", include_in_schema=False)
def static(name: str) -> FileResponse:
    if name not in _STATIC_FILES:  # a fixed list: no path from the request reaches the file system
        raise HTTPException(404, "no such file")
    return FileResponse(STATIC / name, media_type=_STATIC_FILES[name])


@router.get("/api/config")
def config(request: Request) -> dict:
    return {"keys_required": bool(getattr(request.app.state, "label_keys", None))}


@router.get("/api/next")
def next_task(request: Request) -> dict:
    labeler = _labeler(request)
    task = _call(_store(request).next_task, labeler)
    if task is None:
        return {"done": True, "labeler": labeler}
    return {"done": False, "labeler": labeler, "prompt_id": task.prompt_id, "prompt": task.prompt, "messages": task.messages,
            "completions": [{"id": cid, "text": text} for cid, text in task.completions],
            "expires_at": task.expires_at.isoformat(timespec="seconds") + "Z"}


@router.post("/api/rank")
def rank(body: RankBody, request: Request) -> dict:
    rid = _call(_store(request).submit_ranking, _labeler(request), body.prompt_id, body.order)
    return {"ok": True, "ranking_id": rid}


@router.post("/api/skip")
def skip(body: MarkBody, request: Request) -> dict:
    _call(_store(request).skip, _labeler(request), body.prompt_id)
    return {"ok": True}


@router.post("/api/flag")
def flag(body: MarkBody, request: Request) -> dict:
    _call(_store(request).flag, _labeler(request), body.prompt_id, body.note)
    return {"ok": True}


@router.get("/api/progress")
def progress(request: Request) -> dict:
    return _store(request).progress(_labeler(request))
