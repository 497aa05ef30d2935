"""Errors in OpenAI's shape, so that existing clients raise their usual exceptions.

Every error body is `{"error": {"message", "type", "param", "code"}}`; the status code carries the kind:
400 bad request (malformed JSON, invalid parameter, prompt longer than the context), 401 bad or missing
key, 404 unknown model or response id, 429 queue full, 500 a fault of ours (logged, never a traceback).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error answered to the client; `status` is the HTTP status, the rest is the OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
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
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param, code = _validation_message(exc)
        return respond(APIError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return respond(APIError(exc.status_code, str(exc.detail), type=kind, code=kind if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        import logging

        logging.getLogger("gemcut.serve").exception("unhandled error on %s %s", request.method, request.url.path)
        return respond(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error"))
