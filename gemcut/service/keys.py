"""Owners' API keys: made once, shown once, stored as a SHA-256 hash.

    gemcut keys create alice            # prints the new key once
    gemcut keys create ops --admin      # an admin key sees every owner's files, jobs and models
    gemcut keys list | gemcut keys revoke gk-alice-Ab12

A key is 32 random url-safe bytes, so its plain SHA-256 is a safe stored form (a slow hash protects short
human passwords, not random keys) and lets a request's key be found by one indexed lookup. The operator's
keys ($GEMCUT_API_KEYS, --api-key) stay admin keys without a row here.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from gemcut.errors import GemcutError
from gemcut.serve.auth import Principal
from gemcut.service.db import ApiKey, utcnow

OWNER_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # owners appear in model names: ft:base:owner:suffix:id


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class KeyInfo:
    prefix: str
    owner: str
    admin: bool
    created_at: str
    revoked: bool


class KeyRing:
    def __init__(self, sessions: sessionmaker):
        self.sessions = sessions

    def create(self, owner: str, *, admin: bool = False) -> str:
        """A new key for `owner`; the only time the key itself exists outside the caller's hands."""
        if not OWNER_PATTERN.match(owner):
            raise GemcutError(f"owner {owner!r}: use 1-64 letters, digits, '-' or '_' (it becomes part of model names)")
        key = f"gk-{owner}-{secrets.token_urlsafe(32)}"
        with self.sessions() as s, s.begin():
            s.add(ApiKey(key_hash=key_hash(key), prefix=key[: len(owner) + 8], owner=owner, admin=admin))
        return key

    def lookup(self, key: str) -> Principal | None:
        """The principal of a presented key, or None for an unknown or revoked one."""
        with self.sessions() as s:
            row = s.get(ApiKey, key_hash(key))
            if row is None or row.revoked_at is not None:
                return None
            return Principal(row.owner, admin=row.admin)

    def list(self) -> list[KeyInfo]:
        with self.sessions() as s:
            rows = s.scalars(select(ApiKey).order_by(ApiKey.owner, ApiKey.created_at)).all()
            return [KeyInfo(r.prefix, r.owner, r.admin, r.created_at.isoformat(timespec="seconds"), r.revoked_at is not None)
                    for r in rows]

    def revoke(self, prefix: str) -> int:
        """Revoke the keys whose shown prefix is `prefix`; returns how many."""
        with self.sessions() as s, s.begin():
            result = s.execute(update(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow()))
            return result.rowcount or 0
