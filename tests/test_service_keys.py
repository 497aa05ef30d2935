"""Owners' keys: stored hashed, one owner's key scoped to its owner, admin keys see all, revoked keys refused.

    python -m pytest -q tests/test_service_keys.py
"""

from __future__ import annotations

import sqlite3

import httpx
import pytest

from gemcut.errors import GemcutError
from gemcut.serve.auth import Principal
from gemcut.service.keys import KeyRing
from gemcut.service.store import ServiceStore


def test_keys_are_stored_as_hashes_and_found_by_them(tmp_path):
    db = tmp_path / "jobs.db"
    ring = KeyRing(ServiceStore(f"sqlite:///{db}").sessions)
    alice, ops = ring.create("alice"), ring.create("ops", admin=True)
    assert ring.lookup(alice) == Principal("alice", admin=False)
    assert ring.lookup(ops) == Principal("ops", admin=True)
    assert ring.lookup(alice + "x") is None
    stored = sqlite3.connect(db).execute("select key_hash, prefix from service_api_key").fetchall()
    assert stored and all(alice not in h and alice != p and len(h) == 64 for h, p in stored)
    assert alice not in db.read_bytes().decode("latin-1")
    prefix = next(k.prefix for k in ring.list() if k.owner == "alice")
    assert ring.revoke(prefix) == 1 and ring.lookup(alice) is None
    with pytest.raises(GemcutError, match="owner"):
        ring.create("../x")


def test_principals_see_their_own_and_admins_see_all():
    assert Principal("alice").may_see("alice") and not Principal("alice").may_see("bob")
    assert Principal("alice").may_see(None) and Principal("ops", admin=True).may_see("bob")


def test_a_revoked_key_gets_401_and_the_dashboard_page_needs_none(tmp_path):
    from gemcut.serve.registry import ModelRegistry
    from gemcut.service.app import create_service_app
    from gemcut.service.settings import ServiceSettings

    settings = ServiceSettings(api_keys=["operator-key-1"], service_root=str(tmp_path / "svc"), workers=0,
                               db_url=f"sqlite:///{tmp_path / 'serve.db'}", finetune_models=[])
    app = create_service_app(settings, ModelRegistry(settings))
    ring = app.state.service.keys
    alice = ring.create("alice")
    transport = httpx.ASGITransport(app=app)

    async def calls():
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            ok = await http.get("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {alice}"})
            ring.revoke(next(k.prefix for k in ring.list() if k.owner == "alice"))
            refused = await http.get("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {alice}"})
            page = await http.get("/dashboard")
            files = await http.get("/v1/files")
            return ok.status_code, refused.status_code, page.status_code, files.status_code

    import asyncio

    assert asyncio.run(calls()) == (200, 401, 200, 401)


def test_a_job_store_whose_driver_is_missing_names_the_package(tmp_path):
    from gemcut.service.db import make_engine

    with pytest.raises(GemcutError, match=r"needs the Python package 'pg8000': pip install 'gemcut\[postgres\]'"):
        make_engine("postgresql+pg8000://gemcut@127.0.0.1/jobs")
