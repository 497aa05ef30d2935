"""Training faults: an update that poisons the weights, a collapsed run, a refused resume, damaged
checkpoints, and SIGTERM. Tiny random models, CPU, a few seconds each.

    python -m pytest -q tests/test_train_faults.py
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import CORPUS, save_tiny_llama, tiny_llama, tiny_tokenizer
from train_helpers import (
    TINY_RUN,
    bert,
    causal_examples,
    class_examples,
    collate_causal,
    collate_classify,
    config,
    deterministic,
    fit_examples,
    llama,
    tiny_run,
    train_losses,
)

from gemcut import run_folder
from gemcut.config import AdapterConfig, RunConfig, load_config
from gemcut.errors import ConfigError, GemcutError, TrainingError
from gemcut.models.adapters import apply_adapter
from gemcut.models.load import load_run
from gemcut.objectives import CausalLM, Classify
from gemcut.train import guard, loop
from gemcut.train.run import train

TINY_LLAMA_WEIGHTS = 30_880


@pytest.fixture(autouse=True)
def _deterministic():
    deterministic()


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the fixed tiny run (train_helpers.tiny_run), uninterrupted."""
    run = tmp_path_factory.mktemp("straight") / "run"
    tiny_run(run)
    return train_losses(run)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The fixed tiny run, finished: checkpoints step-3, 6, 9 and 12. Copy it before changing it."""
    deterministic()
    run = tmp_path_factory.mktemp("finished") / "run"
    tiny_run(run)
    return run


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"{a} ({i})"}, {"role": "assistant", "content": b}]}
            for i in range(5) for a, b in zip(CORPUS, CORPUS[1:] + CORPUS[:1])]
    path = tmp_path_factory.mktemp("sft") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_overrides(tmp_path, model_dir, data, name, *extra) -> list[str]:
    """A 4-step LoRA SFT run of a tiny Llama folder, validated (and so saved) at steps 2 and 4."""
    return [f"model.name={model_dir}", f"data.train=[{data}]", "data.max_length=64", "data.split.validation=0.2",
            "data.split.test=0", "adapter.r=4", "adapter.alpha=8", "train.batch_size=4", "train.max_steps=4",
            "train.eval_every=2", "train.precision=fp32", "train.lr=1e-3", "train.sample_prompts=0",
            f"output.dir={tmp_path}", f"output.name={name}", *extra]


def run_config(*args, **kwargs) -> RunConfig:
    return load_config(None, run_overrides(*args, **kwargs))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 3. weights that are not finite


def test_an_update_that_overflows_the_weights_stops_before_any_save(tmp_path):
    """lr=1e39 is a finite number, but the first Adam update overflows fp32: step 1's loss and gradient norm
    are fine, the weights after it are not, and step-1 must not be written."""
    with pytest.raises(TrainingError) as err:
        fit_examples(llama(), CausalLM(), causal_examples(), collate_causal, run_dir=tmp_path, config=config(max_steps=3, lr=1e39, save_every=1))
    assert str(err.value).startswith(f"the trainable weights are not finite after step 1 ({TINY_LLAMA_WEIGHTS:,} of "
                                     f"{TINY_LLAMA_WEIGHTS:,} are nan or inf); last good checkpoint: none. Lower train.lr")
    assert run_folder.complete_checkpoints(tmp_path / "checkpoints") == []


def poison_update(monkeypatch, at: int) -> None:
    """Make optimizer update number `at` leave a NaN in one weight, its loss and gradients being fine."""
    make = loop.adamw

    def adamw(groups, **kwargs):
        optimizer, calls = make(groups, **kwargs), []

        def poison(opt, args, kwargs):
            calls.append(1)
            if len(calls) == at:
                with torch.no_grad():
                    opt.param_groups[-1]["params"][0].view(-1)[0] = float("nan")

        optimizer.register_step_post_hook(poison)
        return optimizer

    monkeypatch.setattr(loop, "adamw", adamw)


def test_a_poisoned_update_is_found_at_its_step_and_the_last_good_checkpoint_is_finite(tmp_path, monkeypatch):
    poison_update(monkeypatch, at=3)
    with pytest.raises(TrainingError) as err:  # losses are read at step 4 only (log_every=4)
        fit_examples(llama(), CausalLM(), causal_examples(), collate_causal, run_dir=tmp_path, config=config(max_steps=8, save_every=2, log_every=4))
    good = tmp_path / "checkpoints" / "step-2"
    message = str(err.value)
    assert message.startswith("the trainable weights are not finite after step 3 (by step 4, ")
    assert f"; last good checkpoint: {good}. Lower train.lr" in message
    assert [p.name for p in run_folder.complete_checkpoints(tmp_path / "checkpoints")] == ["step-2"]
    assert all(torch.isfinite(t).all() for t in load_file(str(good / "model.safetensors")).values())


def test_rl_stops_on_weights_that_are_not_finite(tmp_path):
    from test_rl import fit_rl

    from gemcut.train.rollouts import prompt_inputs

    tok = tiny_tokenizer()
    policy = apply_adapter(tiny_llama(tok), AdapterConfig(r=4, alpha=8), "causal_lm")
    prompts = prompt_inputs([{"text": t} for t in CORPUS[:4]], tok)

    def reward(prompts, completions, completion_ids):  # varies within a group, so the update is not zero
        return torch.tensor([float(sum(t % 7 == 0 for t in ids)) for ids in completion_ids])

    cfg = RunConfig.model_validate({"objective": {"kind": "grpo", "rl": {"group_size": 4, "max_new_tokens": 6}},
                                    "train": {"max_steps": 2, "batch_size": 4, "lr": 1e39, "warmup_steps": 0, "save_every": 1},
                                    "output": {"dir": str(tmp_path)}})
    with pytest.raises(TrainingError, match=r"^the trainable weights are not finite after step 1 \(.*; last good checkpoint: none\."):
        fit_rl(policy, tok, prompts, reward, algo="grpo", config=cfg, run_dir=tmp_path / "rl")
    assert run_folder.complete_checkpoints(tmp_path / "rl" / "checkpoints") == []


def test_loading_a_checkpoint_with_a_nan_weight_is_refused(tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    path = run / "checkpoints" / "step-12"
    weights = load_file(str(path / "model.safetensors"))
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(TrainingError) as err:
        run_folder.load_trainable(llama(), path)
    assert str(err.value) == (f"checkpoint {path} cannot be used: model.safetensors holds 1 of {TINY_LLAMA_WEIGHTS:,} weights "
                              "that are nan or inf (in model.norm.weight)")


# ---------------------------------------------------------------- 4. non-finite settings, collapse


@pytest.mark.parametrize("override,field", [
    ("train.lr=inf", "train.lr"), ("train.lr=.nan", "train.lr"), ("train.max_grad_norm=.inf", "train.max_grad_norm"),
    ("train.warmup_ratio=.nan", "train.warmup_ratio"), ("eval.temperature=inf", "eval.temperature"),
    ("objective.class_weights=[1, .inf]", "objective.class_weights"),
])
def test_config_rejects_numbers_that_are_not_finite(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"config: {field}") and "Input should be a finite number" in str(err.value)


def dead_llama():
    """A tiny Llama whose final norm is zero and frozen: every logit is 0, so the loss is ln(vocabulary) and
    no weight gets a gradient, as after the lr=1e3 collapse of issue 17."""
    model = llama()
    model.model.norm.weight.data.zero_()
    model.model.norm.weight.requires_grad_(False)
    return model


def dead_bert():
    model = bert(num_labels=3)
    for p in model.classifier.parameters():
        p.data.zero_()
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("make,objective,examples,collate,level", [
    (dead_llama, CausalLM, causal_examples, collate_causal, "ln 384 = 5.9506"),
    (dead_bert, Classify, class_examples, collate_classify, "ln 3 = 1.0986"),
])
def test_a_collapsed_run_stops_as_collapsed(tmp_path, make, objective, examples, collate, level):
    result = fit_examples(make(), objective(), examples(), collate, run_dir=tmp_path, config=config(max_steps=10, save_every=5))
    assert result.stopped == "collapsed" and result.state.step == 3
    assert result.reason.startswith(f"the model collapsed: for 3 steps up to step 3 the loss sat at {level.split()[-1]}, "
                                    f"the level of a uniform guess ({level})")
    assert result.reason.endswith("with gradient norm 0.0e+00, so the weights no longer change. "
                                  "Lower train.lr (it was 0.01) and start a new run.")
    assert result.last_checkpoint is None and run_folder.complete_checkpoints(tmp_path / "checkpoints") == []
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (rows[-1]["step"], rows[-1]["collapsed"]) == (3, result.reason)


def test_collapse_needs_both_a_uniform_loss_and_no_gradient():
    watch = guard.CollapseWatch(choices=384, lr=0.01)
    level = watch.level
    assert [watch.update(s, 0.001, 0.0) for s in (1, 2, 3, 4)] == [None] * 4  # converged, not collapsed
    assert [watch.update(s, level, 0.5) for s in (5, 6, 7, 8)] == [None] * 4  # a fresh model still learns
    assert [watch.update(s, level, 0.0) for s in (9, 10)] == [None] * 2
    assert watch.update(11, level, 0.3) is None  # the streak is broken
    assert [watch.update(s, level + 0.01, 1e-9) for s in (12, 13)] == [None] * 2
    assert watch.update(14, level, 0.0).startswith("the model collapsed: for 3 steps up to step 14")


def test_a_collapsed_run_writes_no_final_and_its_manifest_says_so(tmp_path, sft_data):
    from transformers import LlamaForCausalLM

    model_dir = save_tiny_llama(tmp_path / "dead-llama")
    model = LlamaForCausalLM.from_pretrained(model_dir)
    model.model.norm.weight.data.zero_()  # frozen under LoRA
    model.save_pretrained(model_dir)
    with pytest.raises(TrainingError, match=r"^the model collapsed: for 3 steps up to step 3 .* Lower train.lr \(it was 0.001\)"):
        train(run_config(tmp_path, model_dir, sft_data, "dead", "train.max_steps=6"))
    manifest = json.loads((tmp_path / "dead" / "manifest.json").read_text())
    assert manifest["stopped"] == "collapsed" and manifest["steps"] == 3
    assert manifest["reason"].startswith("the model collapsed") and manifest["final_files"] == {}
    assert not (tmp_path / "dead" / "final").exists()


# ---------------------------------------------------------------- 5. a refused resume changes nothing


def test_a_refused_resume_leaves_every_file_of_the_run_folder_as_it_was(tmp_path, sft_data):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    run = train(run_config(tmp_path, model_dir, sft_data, "r"))
    before = snapshot(run)
    with pytest.raises(TrainingError, match=r"train\.lr: checkpoint 0\.001, now 0\.002"):
        train(run_config(tmp_path, model_dir, sft_data, "r", "train.lr=2e-3"), resume=True)
    assert snapshot(run) == before
    saved = sft_data.read_bytes()  # the same config (data.train names the same file), other content
    try:
        sft_data.write_text(saved.decode().replace("paris", "rome"))
        with pytest.raises(TrainingError, match="the training data changed since this checkpoint"):
            train(run_config(tmp_path, model_dir, sft_data, "r"), resume=True)
    finally:
        sft_data.write_bytes(saved)
    assert snapshot(run) == before


# ---------------------------------------------------------------- 6. damaged checkpoints


def _truncate(n: int):
    return lambda f: f.write_bytes(f.read_bytes()[:n])


def _wrong_shape(f: Path) -> None:
    """q_proj's weight saved as [1, 32]: it broadcasts into the model's [32, 32], so only a shape check sees it."""
    weights = load_file(str(f))
    weights["model.layers.0.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"][:1].clone()
    save_file(weights, str(f))


DAMAGE = {
    "truncated weights": ("model.safetensors", _truncate(100), "model.safetensors cannot be read (SafetensorError: "),
    "garbage optimizer": ("optimizer.pt", lambda f: f.write_bytes(b"not a zip file"), "optimizer.pt cannot be read ("),
    "truncated rng": ("rng.pt", _truncate(300), "rng.pt cannot be read ("),
    "broken state": ("state.json", lambda f: f.write_text('{"step": 1'), "state.json cannot be read (JSONDecodeError: "),
    "broken config": ("config.yaml", lambda f: f.write_text("train: [unclosed"), "config.yaml cannot be read ("),
    "missing scheduler": ("scheduler.pt", lambda f: f.unlink(), "scheduler.pt is missing"),
    "wrong shape": ("model.safetensors", _wrong_shape,
                    "model.safetensors does not match the model's trainable parameters (model.layers.0.self_attn.q_proj.weight "
                    "is [1, 32] there, [32, 32] in the model)"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_with_the_newest_intact_one(tmp_path, finished, case):
    name, damage, problem = DAMAGE[case]
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    newest = run / "checkpoints" / "step-12"
    damage(newest / name)
    with pytest.raises(TrainingError) as err:
        tiny_run(run, resume=True)
    message = str(err.value)
    assert message.startswith(f"checkpoint {newest} cannot be used: {problem}")
    assert message.endswith(f"\nThe newest intact checkpoint is {run / 'checkpoints' / 'step-9'}; continue from it with "
                            "--resume-from step-9 (the checkpoints after it are removed).")


def test_resume_from_the_newest_intact_checkpoint_gives_the_same_losses(tmp_path, finished, straight):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "checkpoints" / "step-12" / "model.safetensors").write_bytes(b"")
    (run / "checkpoints" / "step-9" / "rng.pt").unlink()
    (run / "checkpoints" / "best").write_text("step-12\n")  # a marker naming a checkpoint the resume removes
    with pytest.raises(TrainingError, match=r"continue from it with --resume-from step-6 "):
        tiny_run(run, resume=True)
    result = tiny_run(run, resume="step-6")
    assert not (run / "checkpoints" / "best").exists()  # this run never evaluated: no best to move back to
    assert result.stopped == "completed" and result.state.step == TINY_RUN["max_steps"]
    assert train_losses(run) == pytest.approx(straight, rel=1e-6)
    assert [p.name for p in run_folder.complete_checkpoints(run / "checkpoints")] == ["step-3", "step-6", "step-9", "step-12"]
    with pytest.raises(TrainingError, match=r"--resume-from step-7: .*step-7 is not a complete checkpoint; complete checkpoints: "
                                            r"step-3, step-6, step-9, step-12"):
        tiny_run(run, resume="step-7")


def test_a_damaged_checkpoint_run_folder(tmp_path, sft_data):
    """Through `train` and `load_run`: the error names the checkpoint and the fix, the refused resume writes
    nothing, and resuming from the named checkpoint finishes the run."""
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    run = train(run_config(tmp_path, model_dir, sft_data, "d"))
    newest = run / "checkpoints" / "step-4"
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:-10])
    with pytest.raises(GemcutError, match=f"^checkpoint {newest} cannot be used: model.safetensors cannot be read"):
        load_run(run, "last")
    (newest / "config.yaml").write_text("model: {name: [")
    with pytest.raises(GemcutError, match=f"^checkpoint {newest} cannot be used: config.yaml cannot be read"):
        load_run(run, "step-4")
    before = snapshot(run)
    with pytest.raises(TrainingError, match="(?s)cannot be used: .*continue from it with --resume-from step-2"):
        train(run_config(tmp_path, model_dir, sft_data, "d"), resume=True)
    assert snapshot(run) == before
    shutil.rmtree(run / "final")
    train(run_config(tmp_path, model_dir, sft_data, "d"), resume="step-2")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stopped"] == "completed" and manifest["steps"] == 4
    load_run(run, "last")


# ---------------------------------------------------------------- 7. SIGTERM


class PauseAt(CausalLM):
    """Announces training step `step` (a file) and sleeps a second inside it, so a SIGTERM lands mid-step."""

    def __init__(self, step: int, ready: Path):
        super().__init__()
        self.step, self.ready, self.calls = step, ready, 0

    def __call__(self, model, batch):
        if model.training:
            self.calls += 1
            if self.calls == self.step:
                self.ready.write_text("in step")
                time.sleep(1.0)
        return super().__call__(model, batch)


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, straight):
    run, ready = tmp_path / "run", tmp_path / "ready"
    pid = os.fork()  # a child that has torch imported already; it trains on one thread, so no pool crosses the fork
    if pid == 0:
        code = 1
        try:
            result = fit_examples(llama(), PauseAt(5, ready), causal_examples(), collate_causal, config=config(**TINY_RUN),
                         run_dir=run, data_hash="synthetic-v1")
            code = 3 if (result.stopped, result.reason) == ("interrupted", "SIGTERM") else 4
        finally:
            os._exit(code)
    deadline = time.time() + 120
    while not ready.exists():
        if os.waitpid(pid, os.WNOHANG)[0] or time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the training child never reached step 5")
        time.sleep(0.02)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3, f"child status {status}"
    latest = run_folder.latest_checkpoint(run / "checkpoints")
    assert latest.name == "step-5"  # saves every 3: this one is SIGTERM's
    run_folder.load_trainable(llama(), latest)
    result = tiny_run(run, resume=True)
    assert result.stopped == "completed" and train_losses(run) == pytest.approx(straight, rel=1e-6)


def test_gemcut_train_on_sigterm_exits_143_with_the_resume_hint(tmp_path, sft_data, monkeypatch):
    from typer.testing import CliRunner

    from gemcut.cli import app, train_cmd  # noqa: F401  (registers `train`)

    real, calls = loop.backward_step, []

    def backward_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM reached the test's handler, not gemcut's")

    monkeypatch.setattr(loop, "backward_step", backward_step)
    (tmp_path / "run.yaml").write_text("{}\n")
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    previous = signal.signal(signal.SIGTERM, unhandled)
    args = ["train", str(tmp_path / "run.yaml"), *run_overrides(tmp_path, model_dir, sft_data, "t")]
    try:
        result = CliRunner().invoke(app, args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 143, (result.output, result.exception)
    assert "stopped by SIGTERM after step 3; saved" in result.output
    # The hint is the real command: the same file and overrides, the run's name pinned, --resume.
    hint = shlex.join(["gemcut", *[a for a in args if a != "output.name=t"], "output.name=t", "--resume"])
    assert f"continue with: {hint}" in " ".join(result.output.split())
    assert run_folder.latest_checkpoint(tmp_path / "t" / "checkpoints").name == "step-3"
    assert not (tmp_path / "t" / "final").exists()

    monkeypatch.setattr(loop, "backward_step", real)
    resumed = CliRunner().invoke(app, shlex.split(hint)[1:])
    assert resumed.exit_code == 0, (resumed.output, resumed.exception)
    assert "resumed from step 3" in resumed.output
    elapsed = {r["step"]: r["elapsed_s"] for r in map(json.loads, (tmp_path / "t" / "metrics.jsonl").read_text().splitlines())
               if "loss" in r}
    assert sorted(elapsed) == [1, 2, 3, 4] and elapsed[4] >= elapsed[3]  # elapsed_s goes on, it does not restart at 0
