"""Bearer API keys on every route but /health.

Keys come from `$GEMCUT_API_KEYS` (comma-separated) and the `api_keys` setting; a request must send
`Authorization: Bearer <key>`. Comparison is constant-time. The app is built with this dependency on the
whole router, so a new route is protected unless it is deliberately listed in `PUBLIC_PATHS`.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from gemcut.serve.errors import APIError

PUBLIC_PATHS = frozenset({"/health"})


def _matches(given: str, keys: set[str]) -> bool:
    # compare_digest against every key, without early exit, so timing leaks neither key nor which matched
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


def require_api_key(request: Request) -> None:
    """FastAPI dependency: raise 401 in OpenAI's shape unless a configured key is presented."""
    if request.url.path in PUBLIC_PATHS:
        return
    keys: set[str] = request.app.state.settings.all_api_keys()
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (keys come from $GEMCUT_API_KEYS or the api_keys setting)",
                       code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not _matches(token.strip(), keys):
        raise APIError(401, "incorrect API key provided", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
