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
import torch
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
    from gemcut.models.load import run_meta, save_final

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
    from gemcut.serve.engine import Engine
    from gemcut.serve.settings import ServeSettings

    folder = save_tiny_llama(tmp_path / "plain")
    plant_code(folder)
    run = full_run(tmp_path / "run")
    engine = Engine(ServeSettings(device="cpu"))
    assert type(engine.add(str(folder)).model).__name__ == "LlamaForCausalLM"
    assert type(engine.add(str(run), name="run").model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()
