"""The ranking page's JSON API over HTTP (the browser test drives the same routes with real clicks)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from gemcut.label.app import create_app, read_keys
from gemcut.label.store import LabelStore


@pytest.fixture()
def store(tmp_path):
    s = LabelStore(f"sqlite:///{tmp_path / 'q.db'}")
    s.add_prompt("p1", ["x", "y", "z"])
    s.add_prompt("p2", ["u", "v"])
    return s


def test_api_round_trip(store):
    client = TestClient(create_app(store), base_url="http://127.0.0.1")
    assert client.get("/").url.path == "/label/"  # the standalone app's root leads to the page
    assert "rank completions" in client.get("/label/").text
    assert client.get("/label/static/label.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/label/static/..%2Fstore.py").status_code == 404
    assert client.get("/label/api/next").status_code == 400  # no labeler name
    alice = {"X-Labeler": "alice"}
    task = client.get("/label/api/next", headers=alice).json()
    assert task["prompt"] == "p1" and len(task["completions"]) == 3
    ids = [c["id"] for c in task["completions"]]
    r = client.post("/label/api/rank", json={"prompt_id": task["prompt_id"], "order": ids[:2]}, headers=alice)
    assert r.status_code == 409 and "exactly once" in r.json()["detail"]
    r = client.post("/label/api/rank", json={"prompt_id": task["prompt_id"], "order": ids}, headers={"X-Labeler": "bob"})
    assert r.status_code == 409 and "not leased to 'bob'" in r.json()["detail"]
    assert client.post("/label/api/rank", json={"prompt_id": task["prompt_id"], "order": ids}, headers=alice).json()["ok"]
    nxt = client.get("/label/api/next", headers=alice).json()
    assert nxt["prompt"] == "p2"
    assert client.post("/label/api/flag", json={"prompt_id": nxt["prompt_id"], "note": "bad"}, headers=alice).json()["ok"]
    assert client.get("/label/api/next", headers=alice).json()["done"] is True
    assert client.get("/label/api/progress", headers=alice).json() == {
        "prompts": 2, "ranked": 1, "flagged": 1, "remaining": 0, "rankings": 1, "mine": 1, "my_skips": 0}


def test_keys_identify_labelers(store, tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# name:key\nalice:alice-secret-1\nbob:bob-secret-22\n")
    keys = read_keys(keys_file)
    client = TestClient(create_app(store, keys), base_url="http://127.0.0.1")
    assert client.get("/label/api/config").json() == {"keys_required": True}
    assert client.get("/label/api/next", headers={"X-Labeler": "alice"}).status_code == 401  # a name alone is not enough
    assert client.get("/label/api/next", headers={"X-Labeler-Key": "wrong"}).status_code == 401
    task = client.get("/label/api/next", headers={"X-Labeler-Key": "bob-secret-22"}).json()
    assert task["labeler"] == "bob"
    keys_file.write_text("carol:short\n")
    from gemcut.errors import GemcutError

    with pytest.raises(GemcutError, match="keys.txt:1"):
        read_keys(keys_file)


def test_ids_beyond_sql_integers_are_refused_by_name(store):
    client = TestClient(create_app(store), base_url="http://127.0.0.1", raise_server_exceptions=False)
    alice = {"X-Labeler": "alice"}
    for path, body, field in (("/label/api/rank", {"prompt_id": 2**70, "order": [1]}, "prompt_id"),
                              ("/label/api/rank", {"prompt_id": 1, "order": [2**70]}, "order"),
                              ("/label/api/skip", {"prompt_id": 2**70}, "prompt_id")):
        r = client.post(path, json=body, headers=alice)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["detail"][0]["loc"][:2] == ["body", field]
