"""What the server refuses before any work is done on a request: bodies over the size limit, and text that
is not Unicode.

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, on_error=metrics.record_error)
    class ChatRequest(UnicodeChecked, ...): ...      # a lone surrogate anywhere in the body -> 400 naming it

Body limit: a body whose Content-Length is over `max_bytes` is answered 413 at once, unread; a body without
one (chunked) is counted as it streams in and answered 413 as soon as it passes the limit. Either way no
more than `max_bytes` is ever held, and the limit holds before authentication and before JSON parsing.
The rest of a refused body is drained by uvicorn and the keep-alive connection stays usable.

Lone surrogates: JSON may escape a UTF-16 surrogate on its own ("\\ud800"), and Python's json module
decodes it into a str that cannot be encoded back to UTF-8, so a tokenizer, the database or the response
encoder would fail on it later as a 500. Valid pairs are joined by the decoder, so any surrogate left in a
decoded string is a lone one.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, model_validator

from gemcut.serve.errors import APIError, error_response, param_path

_SURROGATE = re.compile("[\ud800-\udfff]")


class BodyLimit:
    """ASGI middleware: 413 in OpenAI's error shape for request bodies over `max_bytes`."""

    def __init__(self, app, max_bytes: int, on_error=None, streamed: dict[str, tuple[int, str]] | None = None):
        """`streamed`: paths whose bodies (file uploads) pass through as they arrive instead of being read whole,
        each with its own limit and the setting that raises it."""
        self.app, self.max_bytes, self.on_error = app, max_bytes, on_error
        self.streamed = streamed or {}

    def _too_large(self, size: int | None, limit: int, setting: str) -> APIError:
        given = f"is {size} bytes, more than" if size is not None else "is more than"
        return APIError(413, f"the request body {given} this server accepts ({limit} bytes); send less, or start the "
                             f"server with a larger {setting}", code="request_too_large")

    async def _refuse(self, scope, receive, send, size: int | None, limit: int | None = None,
                      setting: str = "--max-body-bytes (max_body_bytes in a settings file)") -> None:
        err = self._too_large(size, limit or self.max_bytes, setting)
        if self.on_error is not None:
            self.on_error(err.status, err.type)
        await error_response(err)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _content_length(scope)
        if scope.get("path") in self.streamed:
            return await self._stream(scope, receive, send, length, *self.streamed[scope["path"]])
        if length is not None and length > self.max_bytes:
            return await self._refuse(scope, receive, send, length)
        # Read the whole body here (the JSON routes read it whole anyway), counting as it arrives.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, length)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, as the app expects

        await self.app(scope, replay, send)

    async def _stream(self, scope, receive, send, length: int | None, limit: int, setting: str) -> None:
        if length is not None and length > limit:
            return await self._refuse(scope, receive, send, length, limit, setting)
        size = 0

        async def counted():
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > limit:  # a chunked body that passed the limit: the route has not answered yet
                raise self._too_large(None, limit, setting)
            return message

        await self.app(scope, counted, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses a malformed Content-Length before the app sees it
    return None


def lone_surrogate(obj: Any, loc: tuple = ()) -> tuple[tuple, str, int] | None:
    """(location, the surrogate, its character index) of the first lone surrogate in a decoded JSON value,
    keys included; None when every string is valid Unicode."""
    if isinstance(obj, str):
        m = _SURROGATE.search(obj)
        return (loc, m.group(), m.start()) if m else None
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = lone_surrogate(key, loc) or lone_surrogate(value, loc + (key,))
            if found:
                return found
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found = lone_surrogate(value, loc + (i,))
            if found:
                return found
    return None


class UnicodeChecked(BaseModel):
    """Base of a request body: a lone surrogate anywhere in it is a 400 naming where, before validation."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = lone_surrogate(data)
        if found is not None:
            loc, char, index = found
            # The location itself may hold the surrogate (a key): shown escaped, as everything in an error body.
            param = (param_path(loc) or "body").encode("utf-8", "backslashreplace").decode("utf-8")
            # Not a ValueError: pydantic would fold it into its own error without the location.
            raise APIError(400, f"{param}: the text holds a lone UTF-16 surrogate (\\u{ord(char):04x} at character {index}), "
                                "which is not valid Unicode; send valid UTF-8, with surrogates only in pairs",
                           param=param, code="invalid_unicode")
        return data
