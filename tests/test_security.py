"""What gemcut refuses to trust (docs/security.md): a folder's own Python, a foreign Host header, open
databases, keys in logs.

    python -m pytest -q tests/test_security.py
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_runs import API_KEY, free_port, plain_model, running
from tiny import save_tiny_llama, tiny_llama, tiny_tokenizer

from gemcut.errors import GemcutError

# Importing this file runs it: the marker shows whether a folder's code ran.
EVIL = """
import os, pathlib
pathlib.Path(os.environ["GEMCUT_TEST_MARKER"]).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "{model_type}"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def plant_code(folder: Path, model_type: str = "llama") -> None:
    """Give a model folder an `auto_map` into a Python file beside it, as a hostile download would."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(EVIL.format(model_type=model_type))


def full_run(run_dir: Path, *, folder_trusts: bool = True, model_type: str = "llama") -> Path:
    """A finished full-weights run whose own config turns remote code on and whose model folder ships code."""
    from gemcut.config import RunConfig
    from gemcut.data.templates import ChatTemplate
    from gemcut.models.load import save_final
    from gemcut.run_folder import run_meta

    tok = tiny_tokenizer()
    config = RunConfig.model_validate({"model": {"name": "tiny", "trust_remote_code": folder_trusts},
                                       "adapter": {"method": "full"}})
    final = save_final(tiny_llama(tok), tok, ChatTemplate.from_tokenizer(tok), run_dir / "final",
                       meta=run_meta(config, "causal_lm"))
    plant_code(final, model_type)
    return run_dir


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "code-ran"
    monkeypatch.setenv("GEMCUT_TEST_MARKER", str(path))
    return path


# ---------------------------------------------------------------- a folder's own Python


def test_run_folder_cannot_turn_on_its_own_code(tmp_path, marker, caplog):
    from gemcut.models.load import load_run

    run = full_run(tmp_path / "downloaded")
    with caplog.at_level(logging.WARNING, logger="gemcut.models.load"):
        loaded = load_run(run)
    assert not marker.exists(), "the run folder's Python ran without the user's say-so"
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    warning = caplog.text
    assert f"{run / 'final'} asks to run Python code from its files" in warning
    assert "config.json: evil.EvilModel" in warning and "its config sets model.trust_remote_code: true" in warning
    assert "pass --trust-remote-code" in warning


def test_the_user_can_turn_remote_code_on(tmp_path, marker):
    from gemcut.models.load import load_run

    run = full_run(tmp_path / "mine", folder_trusts=False)
    loaded = load_run(run, trust_remote_code=True)
    assert marker.read_text() == "ran"
    assert type(loaded.model).__name__ == "EvilModel"


def test_code_only_model_without_the_flag_is_a_named_error(tmp_path, marker):
    from gemcut.models.load import load_run

    run = full_run(tmp_path / "custom", model_type="evil-arch")
    with pytest.raises(GemcutError) as err:
        load_run(run)
    assert not marker.exists()
    assert str(err.value).startswith(f"{run}: the model needs Python code shipped in its folder, which gemcut does not run")
    assert "pass --trust-remote-code" in str(err.value)


def test_served_and_chatted_folders_do_not_run_their_code(tmp_path, marker):
    from gemcut.serve.registry import ModelRegistry
    from gemcut.serve.settings import ServeSettings

    folder = save_tiny_llama(tmp_path / "plain")
    plant_code(folder)
    run = full_run(tmp_path / "run")
    registry = ModelRegistry(ServeSettings(device="cpu"))
    assert type(registry.add(str(folder)).model).__name__ == "LlamaForCausalLM"
    assert type(registry.add(str(run), name="run").model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


# ---------------------------------------------------------------- servers: Host names, keys, logs


def _label_store(tmp_path):
    from gemcut.label.store import LabelStore

    store = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_prompt("a private prompt", ["x", "y"])
    return store


def test_label_server_answers_only_to_its_own_host_names(tmp_path):
    from gemcut.label.app import create_app

    app = create_app(_label_store(tmp_path), allowed_hosts=["labels.internal"])
    with running(app) as url:
        port = url.rsplit(":", 1)[1]
        alice = {"X-Labeler": "alice"}
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "labels.internal"):
            r = httpx.get(f"{url}/label/api/next", headers={**alice, "Host": host})
            assert r.status_code == 200 and r.json()["prompt"] == "a private prompt", host
        # What a page on a rebinding attacker's domain sends once that name resolves to 127.0.0.1.
        r = httpx.get(f"{url}/label/api/next", headers={**alice, "Host": f"attacker.example:{port}"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_host"
        assert r.json()["error"]["message"] == (
            f"Host header 'attacker.example:{port}' is not a name this server answers to (127.0.0.1, ::1, labels.internal, "
            "localhost); if you reach it through another name, start it with --allowed-host NAME")
        assert "private" not in r.text


def test_label_server_beyond_loopback_needs_keys(tmp_path):
    from gemcut.label.app import create_app

    with pytest.raises(GemcutError) as err:
        create_app(_label_store(tmp_path), host="0.0.0.0")
    assert str(err.value) == ("binding 0.0.0.0 puts the ranking page (prompts, rankings) beyond this machine: pass --keys FILE "
                              "(lines of name:key) so only your labelers get in, or leave --host at 127.0.0.1")
    create_app(_label_store(tmp_path), {"alice": "alice-secret-1"}, host="0.0.0.0")  # with keys it starts


def test_inference_server_refuses_foreign_host_names(tmp_path):
    from gemcut.serve.app import create_app
    from gemcut.serve.settings import ServeSettings

    settings = ServeSettings(models=[str(plain_model(tmp_path / "tiny"))], api_keys=[API_KEY], device="cpu",
                             db_url=f"sqlite:///{tmp_path / 'serve.db'}")
    with running(create_app(settings)) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.get(f"{url}/v1/models", headers={"Host": "attacker.example", "Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_databases_are_readable_by_their_owner_only(tmp_path):
    from gemcut.label.store import LabelStore
    from gemcut.serve.store import Store

    old = os.umask(0o022)  # the usual umask: without care SQLite's files come out 0644
    try:
        _label_store(tmp_path / "fresh")
        existing = tmp_path / "existing.db"
        existing.write_bytes(b"")
        existing.chmod(0o644)
        LabelStore(f"sqlite:///{existing}")
        serve_store = Store(f"sqlite:///{tmp_path / 'serve' / 'serve.db'}", 30)
        with serve_store.engine.connect() as conn:  # WAL mode: -wal and -shm exist while a connection is open
            conn.exec_driver_sql("SELECT count(*) FROM request_log")
            files = [tmp_path / "fresh" / "labels.db", existing, *(tmp_path / "serve").iterdir()]
            modes = {f.name: _mode(f) for f in files}
    finally:
        os.umask(old)
    assert {"serve.db-wal", "serve.db-shm"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o600)


def test_a_key_in_the_query_string_never_reaches_the_log(tmp_path):
    folder = plain_model(tmp_path / "tiny")
    port = free_port()
    env = {**os.environ, "GEMCUT_API_KEYS": API_KEY}
    gemcut = str(Path(sys.executable).parent / "gemcut")
    proc = subprocess.Popen([gemcut, "serve", "--model", str(folder), "--port", str(port),
                             "--db", f"sqlite:///{tmp_path / 'serve.db'}", "--threads", "1", "--service-root", str(tmp_path / "service")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "gemcut serve did not start"
            time.sleep(0.2)
        httpx.get(f"http://127.0.0.1:{port}/v1/models?api_key=sk-query-secret-1&limit=2")
        httpx.get(f"http://127.0.0.1:{port}/health?token=sk-query-secret-2")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "GET /v1/models?api_key=***&limit=*** HTTP/1.1" in out and "/health?token=***" in out  # the access log is on
    assert "sk-query-secret" not in out
