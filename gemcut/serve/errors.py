"""Errors in OpenAI's shape, so that existing clients raise their usual exceptions.

Every error body is `{"error": {"message", "type", "param", "code"}}`; the status code carries the kind:
400 bad request (malformed JSON, invalid parameter, prompt longer than the context), 401 bad or missing
key, 404 unknown model or response id, 413 body over the size limit (gemcut/serve/limits.py), 429 queue
full, 500 a fault of ours. A 500 says only that it happened: the exception, with its traceback, goes to the
server's log, never to the client. Error bodies are written with JSON's \\u escapes, so that no text a
client sent (a lone surrogate, say) can make the error itself fail to encode.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("gemcut.serve")


class APIError(Exception):
    """An error answered to the client; `status` is the HTTP status, the rest is the OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _ErrorResponse(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(err: APIError) -> JSONResponse:
    """The HTTP response of an APIError (ASCII JSON: it always encodes, whatever text it quotes)."""
    return _ErrorResponse(err.body(), status_code=err.status, headers=err.headers)


def param_path(loc) -> str | None:
    """A location as clients write it: ("messages", 0, "content") -> "messages[0].content"; () -> None."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out or None


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None, "invalid_request"
    first = errs[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"the request body is not valid JSON ({ctx.get('error', 'parse error')})", None, "invalid_json"
    loc = list(first.get("loc", ()))
    param = param_path(loc[1:] if loc[:1] == ["body"] else loc)
    given = first.get("input")
    shown = repr(given) if not isinstance(given, dict) else "an object"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    msg = f"{param or 'body'}: {first.get('msg')} (given: {shown})"
    if len(errs) > 1:
        msg += f"; and {len(errs) - 1} more problem(s)"
    return msg, param, "invalid_value" if param else "invalid_request"


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Map every exception to the OpenAI error body; `on_error(status, type)` counts it (metrics)."""

    def respond(err: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(err.status, err.type)
        return error_response(err)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param, code = _validation_message(exc)
        return respond(APIError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body" for bytes that are not text
            return respond(APIError(400, f"the request body is not valid JSON text ({exc.__cause__.reason} at byte "
                                         f"{exc.__cause__.start}); send UTF-8", code="invalid_json"))
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return respond(APIError(exc.status_code, str(exc.detail), type=kind, code=kind if exc.status_code == 404 else None))

    app.add_middleware(CatchAll, on_error=on_error)


class CatchAll:
    """ASGI middleware: any exception no handler took becomes a generic 500 in OpenAI's shape, logged here.

    Starlette's own last resort re-raises to the server after answering, and uvicorn then closes the
    connection, so a client's next request on it would fail; this answers and keeps the connection."""

    def __init__(self, app, on_error=None):
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            err = APIError(500, "the server failed to answer this request; the details are in its log", type="server_error",
                           code="internal_error")
            if self.on_error is not None:
                self.on_error(err.status, err.type)
            if not started:  # a response already under way (a stream) can only be cut short
                await error_response(err)(scope, receive, send)
