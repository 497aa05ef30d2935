"""What a gemcut web server takes from the network: the Host header it answers to, and what its access
log may write. Used by `gemcut serve` and `gemcut label` (docs/security.md).

- Host check (`install_host_check`): a page on a loopback server is reachable from any web page the user
  opens if an attacker's domain re-resolves to 127.0.0.1 (DNS rebinding); the browser then sends the
  attacker's name in `Host`. A server bound to loopback answers only to loopback names; one bound to a
  named address answers to that address and the names the user allows (`--allowed-host`). A server
  bound to every interface (0.0.0.0, ::) cannot know its names and accepts any Host unless names are
  given; such a server requires keys (each server's own rule).
- Access log (`uvicorn_log_config`): uvicorn logs each request's path with its query string; a client
  that sends its key as `?api_key=...` would have it written to the log. Query values are replaced by
  `***` before a record is formatted.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
ANY_INTERFACE = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server on this machine."""
    return host.strip("[]").lower() in LOOPBACK_NAMES or host.startswith("127.")


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to `bind` answers to; None accepts any (every interface, no names given)."""
    extra = {h.strip("[]").lower() for h in extra}
    bind = bind.strip("[]").lower()
    if bind in ANY_INTERFACE:
        return frozenset(extra) or None
    names = {bind, *extra}
    if is_loopback(bind):
        names |= set(LOOPBACK_NAMES)
    return frozenset(names)


def host_name(header: str) -> str:
    """The name part of a Host header: `[::1]:8000` -> `::1`, `Example.com:80` -> `example.com`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: 400 in OpenAI's error shape for a request whose Host names another server.

    A request without a Host header (HTTP/1.0 tools) passes: browsers, the only carriers of a rebinding
    attack, always send one.
    """

    def __init__(self, app, allowed: frozenset[str]):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            raw = dict(scope.get("headers") or []).get(b"host")
            if raw is not None and host_name(raw.decode("latin-1")) not in self.allowed:
                return await self._refuse(raw.decode("latin-1"), send)
        await self.app(scope, receive, send)

    async def _refuse(self, given: str, send) -> None:
        message = (f"Host header {given!r} is not a name this server answers to ({', '.join(sorted(self.allowed))}); "
                   "if you reach it through another name, start it with --allowed-host NAME")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "invalid_host"}}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def install_host_check(app, bind: str, extra: Iterable[str] = ()) -> None:
    """Make `app` refuse foreign Host headers for a server bound to `bind` (see the module docstring)."""
    allowed = allowed_hosts(bind, extra)
    if allowed is not None:
        app.add_middleware(HostCheck, allowed=allowed)


# ---------------------------------------------------------------- access log


def redact_query(path: str) -> str:
    """`/v1/models?api_key=sk-1&x=2` -> `/v1/models?api_key=***&x=***`: names kept, every value hidden."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    return f"{base}?{urlencode([(k, '***') for k, _ in parse_qsl(query, keep_blank_values=True)], safe='*')}"


class RedactQueryValues(logging.Filter):
    """Hide query-string values in uvicorn's access records (args: client, method, path, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def uvicorn_log_config() -> dict:
    """uvicorn's own logging config with `RedactQueryValues` on the access handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_query"] = {"()": f"{__name__}.RedactQueryValues"}
    config["handlers"]["access"].setdefault("filters", []).append("redact_query")
    return config
