"""Every route of the app but /health refuses a missing or wrong bearer key; the right key gets through.

    python -m pytest -q tests/test_serve_auth.py

The routes are enumerated from `app.routes`, so a route added later is covered without editing this test.
"""

from __future__ import annotations

import re

import pytest
import torch
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from serve_runs import API_KEY, plain_model
from starlette.routing import Mount, Route

from gemcut.errors import GemcutError
from gemcut.serve.app import create_app
from gemcut.serve.auth import PUBLIC_PATHS
from gemcut.serve.settings import ServeSettings


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("auth")
    return create_app(ServeSettings(models=[str(plain_model(tmp / "tiny"))], api_keys=[API_KEY], db_url=f"sqlite:///{tmp / 'db.sqlite'}"))


def _flatten(routes):
    for route in routes:
        if isinstance(route, Mount):
            pytest.fail(f"mounted sub-application at {route.path} bypasses the app's auth dependency")
        if hasattr(route, "effective_route_contexts"):  # FastAPI >= 0.16x keeps included routers as one entry
            yield from _flatten(route.effective_route_contexts())
        elif isinstance(route, (APIRoute, Route)) or hasattr(route, "path_format"):
            yield route


def _routes(app) -> list[tuple[str, str]]:
    out = []
    for route in _flatten(app.routes):
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for method in sorted(route.methods or {"GET"}):
            if method != "HEAD":
                out.append((method, path))
    return out


def test_every_protected_route_refuses_missing_and_wrong_keys(app):
    routes = _routes(app)
    paths = {p for _, p in routes}
    for expected in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/feedback", "/metrics", "/health",
                     "/openapi.json"):
        assert expected in paths
    client = TestClient(app, base_url="http://127.0.0.1")  # no lifespan: auth is checked before any model work
    checked = 0
    for method, path in routes:
        if path in PUBLIC_PATHS:
            continue
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {API_KEY}"}, {"Authorization": "Bearer "}):
            r = client.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
            err = r.json()["error"]
            assert err["code"] in ("missing_api_key", "invalid_api_key") and err["type"] == "invalid_request_error"
        checked += 1
    assert checked >= 6


def test_right_key_passes_and_health_is_public(app):
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert client.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_keys_from_the_environment(app, monkeypatch):
    monkeypatch.setenv("GEMCUT_API_KEYS", "env-key-1, env-key-2")
    client = TestClient(app, base_url="http://127.0.0.1")
    assert client.get("/v1/models", headers={"Authorization": "Bearer env-key-2"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer env-key-3"}).status_code == 401


def test_no_key_configured_refuses_to_build(monkeypatch, tmp_path):
    monkeypatch.delenv("GEMCUT_API_KEYS", raising=False)
    with pytest.raises(GemcutError, match="no API key"):
        create_app(ServeSettings(models=["unused"], db_url=f"sqlite:///{tmp_path / 'db.sqlite'}"))
    assert ServeSettings().host == "127.0.0.1"
