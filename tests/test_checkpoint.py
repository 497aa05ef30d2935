"""Checkpoints: atomic layout, exact resume after SIGKILL, a kill during a save, compatibility checks,
pruning that keeps the best, and loading with weights_only.

    python -m pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import (
    TINY_RUN,
    causal_examples,
    collate_causal,
    config,
    deterministic,
    fit_examples,
    llama,
    tiny_run,
    train_losses,
)

from gemcut import run_folder
from gemcut.errors import TrainingError
from gemcut.objectives import CausalLM
from gemcut.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the fixed tiny run, uninterrupted."""
    run = tmp_path_factory.mktemp("straight") / "run"
    tiny_run(run)
    return train_losses(run)


def test_layout_and_weights_only_contents(tmp_path):
    deterministic()
    model = llama()
    for name, p in model.named_parameters():  # freeze all but the last block, like adapter=freeze
        p.requires_grad = "layers.1." in name
    fit_examples(model, CausalLM(), causal_examples(), collate_causal, run_dir=tmp_path, config=config(max_steps=2, save_every=1, keep_last_n=5))
    path = run_folder.latest_checkpoint(tmp_path / "checkpoints")
    assert path.name == "step-2"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["COMPLETE", "config.yaml", "model.safetensors", "optimizer.pt", "rng.pt", "scheduler.pt", "state.json"])
    saved = load_file(str(path / "model.safetensors"))
    assert saved.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for f in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(path / f, weights_only=True)  # raises if anything needs unpickling
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 2 and state["index"] == 8 and state["epoch"] == 0
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_sigkill_mid_epoch_then_resume_gives_the_same_losses(tmp_path, straight):
    run = tmp_path / "run"
    ready = run.with_suffix(".ready")
    # A forked child (it has torch and the test modules imported already, which saves seconds of startup);
    # it trains with one thread, so no OpenMP pool crosses the fork.
    pid = os.fork()
    if pid == 0:
        try:
            tiny_run(run, hang_at=8)
        finally:
            os._exit(1)
    deadline = time.time() + 120
    while not ready.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            pytest.fail(f"training child exited early with status {status}")
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("training child never reached step 8")
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    latest = run_folder.latest_checkpoint(run / "checkpoints")
    assert latest.name == "step-6"  # saves every 3; killed inside step 8
    assert json.loads((latest / "state.json").read_text())["index"] == 24  # mid-epoch: 24 of 32 examples
    result = tiny_run(run, resume=True)
    assert result.state.step == TINY_RUN["max_steps"]
    assert train_losses(run) == pytest.approx(straight, rel=1e-6)


def test_kill_during_save_resumes_from_previous_good_checkpoint(tmp_path, straight):
    run = tmp_path / "run"
    tiny_run(run)
    root = run / "checkpoints"
    for late in ("step-9", "step-12"):  # as if the run had been killed after step 6's save
        shutil.rmtree(root / late)
    # what a process killed while saving step 9 leaves: a half-written .tmp folder, no COMPLETE marker
    half = root / ".tmp-step-9"
    shutil.copytree(root / "step-6", half)
    (half / "COMPLETE").unlink()
    (half / "optimizer.pt").write_bytes(b"truncat")
    # and a step folder without marker (never produced by save_checkpoint, but ignored all the same)
    shutil.copytree(half, root / "step-12")
    assert run_folder.latest_checkpoint(root).name == "step-6"
    result = tiny_run(run, resume=True)
    assert result.state.step == 12
    assert train_losses(run) == pytest.approx(straight, rel=1e-6)
    assert not half.exists()  # the next save cleaned it up


def test_resume_refuses_other_data_or_config(tmp_path):
    deterministic()
    fit_examples(llama(), CausalLM(), causal_examples(), collate_causal, run_dir=tmp_path, data_hash="a", config=config(max_steps=1))
    with pytest.raises(TrainingError, match="training data changed"):
        fit_examples(llama(), CausalLM(), causal_examples(), collate_causal, run_dir=tmp_path, data_hash="b", config=config(max_steps=2), resume=True)
    with pytest.raises(TrainingError, match=r"train\.lr: checkpoint 0\.01, now 0\.5"):
        fit_examples(llama(), CausalLM(), causal_examples(), collate_causal, run_dir=tmp_path, data_hash="a", config=config(max_steps=1, lr=0.5),
            resume=True)
    # settings that do not change the computation may differ
    ckpt.check_compatible(run_folder.latest_checkpoint(tmp_path / "checkpoints"), data_hash="a",
                          config=config(max_steps=1, log_every=5, force=True).model_dump(mode="json"))
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        fit_examples(llama(), CausalLM(), causal_examples(), collate_causal, run_dir=tmp_path / "empty", config=config(max_steps=1), resume=True)


def test_a_checkpoint_from_before_a_new_config_field_still_resumes(tmp_path):
    """A field added to the config since a checkpoint was saved reads as its default, not as a difference."""
    deterministic()
    fit_examples(llama(), CausalLM(), causal_examples(), collate_causal, run_dir=tmp_path, data_hash="a", config=config(max_steps=1))
    latest = run_folder.latest_checkpoint(tmp_path / "checkpoints")
    saved = yaml.safe_load((latest / "config.yaml").read_text())
    del saved["data"]["extra_fields"], saved["train"]["fast"]  # as an older gemcut wrote it
    (latest / "config.yaml").write_text(yaml.safe_dump(saved))
    ckpt.check_compatible(latest, data_hash="a", config=config(max_steps=1).model_dump(mode="json"))
    with pytest.raises(TrainingError, match=r"train\.fast: checkpoint True, now False"):
        ckpt.check_compatible(latest, data_hash="a", config=config(max_steps=1, fast=False).model_dump(mode="json"))


def test_prune_keeps_best_and_newest(tmp_path):
    model = llama()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched, state=ckpt.TrainState(step=step),
                             config={}, keep_last_n=2, is_best=step == 2)
    assert [p.name for p in run_folder.complete_checkpoints(tmp_path)] == ["step-2", "step-4", "step-5"]
    assert (tmp_path / "best").read_text().strip() == "step-2"


def test_rng_state_roundtrip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.random(), np.random.rand(), torch.rand(())
    ckpt.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
