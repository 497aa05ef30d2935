"""`gemcut serve` as a real process on loopback, and `gemcut chat` in a terminal session.

    python -m pytest -q tests/test_serve_cli.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import torch
from serve_runs import API_KEY, free_port, plain_model
from typer.testing import CliRunner


def test_serve_command_runs_uvicorn_on_loopback(tmp_path):
    model = plain_model(tmp_path / "tiny")
    port = free_port()
    env = {**os.environ, "GEMCUT_API_KEYS": API_KEY, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from gemcut.cli import main; main()", "serve", "--model", str(model), "--port", str(port),
           "--db", f"sqlite:///{tmp_path / 'serve.db'}", "--threads", "1", "--service-root", str(tmp_path / "service")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(20)


def test_chat_command_streams_with_the_template(tmp_path):
    from gemcut.cli import app, register_commands

    torch.set_num_threads(1)
    register_commands()
    model = plain_model(tmp_path / "tiny")
    result = CliRunner().invoke(app, ["chat", str(model), "--max-tokens", "4", "--temperature", "0"],
                                input="hello world\n/reset\nthe quick brown fox\n/quit\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("bot> ") == 2 and "tiny (context 256 tokens)" in result.output
