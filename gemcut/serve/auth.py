"""Bearer API keys on every route but /health, and who each key belongs to.

Keys come from `$GEMCUT_API_KEYS` (comma-separated) and the `api_keys` setting: these are the operator's
keys, admin keys that see everything. A server that hosts several owners (the fine-tuning service,
gemcut/service/) also sets `app.state.key_lookup`, a function from a presented key to its `Principal` (an
owner's key, stored hashed) or None. A request must send `Authorization: Bearer <key>`; the key's principal
is put on `request.state.principal` for routes that scope what they show. Comparison with the operator's
keys is constant-time. The app is built with this dependency on the whole router, so a new route is
protected unless it is deliberately public: `/health`, and the paths under `app.state.public_prefixes` (static
pages that hold no data and ask for a key themselves, such as the dashboard).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from gemcut.serve.errors import APIError

PUBLIC_PATHS = frozenset({"/health"})
OPERATOR = "admin"  # the owner name of the operator's keys


@dataclass(frozen=True)
class Principal:
    """Who is calling: an owner, and whether the key may see every owner's files, jobs and models."""

    owner: str
    admin: bool = False

    def may_see(self, owner: str | None) -> bool:
        """Whether this caller may see (and touch) something that belongs to `owner` (None: everyone's)."""
        return owner is None or self.admin or owner == self.owner


def _matches(given: str, keys: set[str]) -> bool:
    # compare_digest against every key, without early exit, so timing leaks neither key nor which matched
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


def _public(request: Request) -> bool:
    path = request.url.path
    prefixes = getattr(request.app.state, "public_prefixes", ())
    return path in PUBLIC_PATHS or any(path == p or path.startswith(p + "/") for p in prefixes)


def require_api_key(request: Request) -> None:
    """FastAPI dependency: raise 401 in OpenAI's shape unless a known key is presented; set its principal."""
    if _public(request):
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (keys come from $GEMCUT_API_KEYS or the api_keys setting)",
                       code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    principal = Principal(OPERATOR, admin=True) if _matches(token, request.app.state.settings.all_api_keys()) else None
    lookup = getattr(request.app.state, "key_lookup", None)
    if principal is None and lookup is not None:
        principal = lookup(token)
    if principal is None:
        raise APIError(401, "incorrect API key provided", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    request.state.principal = principal


def principal_of(request: Request) -> Principal:
    """The caller of a protected route (require_api_key has run)."""
    return request.state.principal
