"""GRPO and PPO on a tiny random Llama with a toy reward; resume; the pure RL losses against hand values."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from gemcut.config import AdapterConfig, RunConfig
from gemcut.models.adapters import apply_adapter
from gemcut.objectives import build_objective
from gemcut.objectives.grpo import group_advantages, grpo_loss, kl_k3
from gemcut.objectives.ppo import gae, ppo_loss, shaped_rewards, whiten
from gemcut.tasks import task_named
from gemcut.train.loop import fit
from gemcut.train.rollouts import collect, prompt_inputs, reward_hacking_warning, rl_training

PROMPTS = ["hello world", "the quick brown fox", "i love this", "the weather is", "what is the capital", "i hate waiting"]


def count_reward(prompts, completions, completion_ids):
    """Toy reward: how many generated tokens belong to a fixed set (ids divisible by 7, ~1/7 of the vocabulary)."""
    return torch.tensor([float(sum(t % 7 == 0 for t in ids)) for ids in completion_ids])


def make_policy():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    with torch.no_grad():  # a peakier random model (logits of a few nats), so that a small LoRA can move it
        model.model.embed_tokens.weight.mul_(10)
    return apply_adapter(model, AdapterConfig(r=8, alpha=16), "causal_lm"), tok


def config(algo: str, steps: int, tmp_path, **train) -> RunConfig:
    lr, batch = (2e-2, 6) if algo == "grpo" else (1e-2, 4)
    return RunConfig.model_validate({
        "objective": {"kind": algo, "rl": {"group_size": 8, "max_new_tokens": 8, "kl_coef": 0.01,
                                           "ppo_epochs": 1 if algo == "grpo" else 2}},
        "train": {"max_steps": steps, "batch_size": batch, "lr": lr, "schedule": "constant", "warmup_steps": 0,
                  "precision": "fp32", **train},
        "output": {"dir": str(tmp_path)},
    })


def fit_rl(policy, tok, prompts, reward_fn, *, algo, config, run_dir, resume=False, val_prompts=None):
    """The one loop on rollouts, as `gemcut train` runs GRPO and PPO (gemcut/train/run.py)."""
    task = task_named(algo)
    source, validation, trained = rl_training(task, config, policy, tok, prompts, reward_fn, val_prompts)
    return fit(trained, build_objective(task, config), source, config=config, task=task, run_dir=run_dir,
               validation=validation, resume=resume)


def history(run_dir) -> list[dict]:
    """The training lines of metrics.jsonl (one per iteration)."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"reward_mean"' in x]


def mean_reward(policy, tok, prompts) -> float:
    ro = collect(policy, tok, prompts, count_reward, group_size=16, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=1234)
    return float(ro.rewards.mean())


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("algo,steps,gain", [("grpo", 12, 2.0), ("ppo", 15, 1.5)])
def test_rl_raises_the_toy_reward(algo, steps, gain, tmp_path):
    policy, tok = make_policy()
    prompts = prompt_inputs([{"text": t} for t in PROMPTS], tok)
    before = mean_reward(policy, tok, prompts)
    held_out = prompt_inputs([{"text": "nothing special"}, {"text": "paris is"}], tok)
    result = fit_rl(policy, tok, prompts, count_reward, algo=algo, config=config(algo, steps, tmp_path), run_dir=tmp_path / algo,
                    val_prompts=held_out)
    after = mean_reward(policy, tok, prompts)
    assert after > before + gain, (before, after)
    # Held-out prompts: the tuned policy beats its own reference (adapter off) on the same seed.
    val = [json.loads(x) for x in (tmp_path / algo / "metrics.jsonl").read_text().splitlines() if '"val_reward_mean"' in x]
    assert len(val) == 1 and val[0]["step"] == steps
    assert val[0]["val_reward_mean"] > val[0]["val_reward_ref"] + gain / 2 and val[0]["val_kl"] > 0
    # Diagnostics on every iteration, in metrics.jsonl too.
    lines = [json.loads(x) for x in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "reward_mean" in x]
    assert [x["step"] for x in train_lines] == list(range(1, steps + 1))
    for key in ("reward_mean", "reward_std", "kl", "entropy", "clip_frac", "response_len", "loss", "grad_norm"):
        assert all(math.isfinite(x[key]) for x in train_lines), key
    assert train_lines[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA starts at B = 0: policy == reference
    assert train_lines[-1]["kl"] > 0.1
    samples = [json.loads(x) for x in (tmp_path / algo / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == set(range(1, steps + 1)) and all("reward" in s for s in samples)
    assert any("reference_output" in s for s in samples)
    if algo == "ppo":
        assert "value_loss" in train_lines[-1]
        assert any(x["clip_frac"] > 0 for x in train_lines)  # the second PPO epoch moves off ratio 1
    assert result.state.step == steps


def test_rl_resume_gives_the_same_trajectory(tmp_path):
    def run(name, resume=False):
        policy, tok = make_policy()
        prompts = prompt_inputs([{"text": t} for t in PROMPTS], tok)
        result = fit_rl(policy, tok, prompts, count_reward, algo="ppo", config=config("ppo", 4, tmp_path, save_every=2),
                        run_dir=tmp_path / name, resume=resume)
        return result, policy

    _, p_straight = run("straight")
    # The same run as if killed after the checkpoint of iteration 2: drop the later one and resume from fresh weights.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-4")
    _, p_resumed = run("resumed", resume=True)
    straight, resumed = history(tmp_path / "straight"), history(tmp_path / "resumed")
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]  # metrics read as one run
    for a, b in zip(straight[2:], resumed[2:]):
        for key in ("reward_mean", "kl", "loss", "entropy", "clip_frac", "value_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    sd_a = {n: p for n, p in p_straight.named_parameters() if p.requires_grad}
    sd_b = {n: p for n, p in p_resumed.named_parameters() if p.requires_grad}
    assert sd_a.keys() == sd_b.keys()
    for n in sd_a:
        torch.testing.assert_close(sd_a[n], sd_b[n], rtol=1e-5, atol=1e-6)


def test_resume_refuses_a_changed_config(tmp_path):
    policy, tok = make_policy()
    prompts = prompt_inputs([{"text": t} for t in PROMPTS], tok)
    fit_rl(policy, tok, prompts, count_reward, algo="grpo", config=config("grpo", 1, tmp_path), run_dir=tmp_path / "r")
    changed = config("grpo", 2, tmp_path)
    changed.objective.rl.kl_coef = 0.5
    from gemcut.errors import TrainingError

    with pytest.raises(TrainingError, match="kl_coef"):
        fit_rl(policy, tok, prompts, count_reward, algo="grpo", config=changed, run_dir=tmp_path / "r", resume=True)


def test_rl_needs_a_lora_policy(tmp_path):
    from gemcut.errors import TrainingError

    tok = tiny_tokenizer()
    with pytest.raises(TrainingError, match="adapter.method=lora"):
        fit_rl(tiny_llama(tok), tok, prompt_inputs([{"text": "hi"}], tok), count_reward, algo="grpo",
               config=config("grpo", 1, tmp_path), run_dir=tmp_path / "x")


def test_prompts_from_records_use_the_template_for_chat_records():
    tok = tiny_tokenizer()
    raw, chat = prompt_inputs([{"text": "the weather is"}, {"prompt": "say hi"}], tok)
    assert raw["input_ids"] == tok("the weather is")["input_ids"]
    assert tok.decode(chat["input_ids"]) == "<|im_start|>user\nsay hi<|im_end|>\n<|im_start|>assistant\n"
    assert chat["prompt"] == "say hi"


# ---------------------------------------------------------------- pure losses, by hand


def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), group_size=2, eps=0.0 + 1e-12)
    # group 1: mean 2, std 1 -> [-1, 1]; group 2: identical rewards -> 0 (no signal)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_kl_k3_is_zero_at_equality_and_positive_elsewhere():
    lp = torch.tensor([-1.0, -2.0])
    torch.testing.assert_close(kl_k3(lp, lp), torch.zeros(2))
    # ref - logp = d = 0.5: e^0.5 - 0.5 - 1
    assert float(kl_k3(torch.tensor([-1.0]), torch.tensor([-0.5]))) == pytest.approx(math.exp(0.5) - 1.5)


def test_grpo_loss_by_hand():
    # One completion of 2 tokens, advantage 1, ratio e^0.1 on token 1 (inside clip 0.2), e^0.5 on token 2 (clipped to 1.2).
    logp = torch.tensor([[0.1, 0.5]])
    old = torch.zeros(1, 2)
    out = grpo_loss(logp, old, old, torch.tensor([1.0]), torch.ones(1, 2), clip_range=0.2, kl_coef=0.0)
    expected = -(math.exp(0.1) + 1.2) / 2
    assert float(out.loss_sum) == pytest.approx(expected, rel=1e-6)
    assert out.n_targets == 1
    assert float(out.metrics["clip_frac"]) == pytest.approx(0.5)
    # The KL term: with logp = old = 0, ref = -1 on both tokens -> k3 = e^-1 + 1 - 1 = e^-1 each.
    out = grpo_loss(torch.zeros(1, 2), old, -torch.ones(1, 2), torch.tensor([0.0]), torch.ones(1, 2), clip_range=0.2, kl_coef=0.5)
    assert float(out.loss_sum) == pytest.approx(0.5 * math.exp(-1), rel=1e-6)
    # Padding (mask 0) does not count.
    out = grpo_loss(torch.tensor([[0.1, 9.0]]), old, old, torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]), clip_range=0.2, kl_coef=0.0)
    assert float(out.loss_sum) == pytest.approx(-math.exp(0.1), rel=1e-6)


def test_ppo_gae_and_loss_by_hand():
    # Two generated tokens, gamma = 1, lambda = 0.5, values [0.5, 0.25], reward 1 at the end, no KL.
    mask = torch.ones(1, 2)
    r = shaped_rewards(torch.tensor([1.0]), torch.zeros(1, 2), torch.zeros(1, 2), mask, kl_coef=0.1)
    torch.testing.assert_close(r, torch.tensor([[0.0, 1.0]]))
    adv, ret = gae(r, torch.tensor([[0.5, 0.25]]), mask, gamma=1.0, lam=0.5)
    # delta_1 = 1 + 0 - 0.25 = 0.75 ; delta_0 = 0 + 0.25 - 0.5 = -0.25 ; A_0 = -0.25 + 0.5 * 0.75 = 0.125
    torch.testing.assert_close(adv, torch.tensor([[0.125, 0.75]]))
    torch.testing.assert_close(ret, torch.tensor([[0.625, 1.0]]))
    # KL shaping: each token pays kl_coef * (old - ref); padding pays nothing; the score lands on the last real token.
    r = shaped_rewards(torch.tensor([2.0]), torch.tensor([[0.0, -1.0, 5.0]]), torch.tensor([[-1.0, -1.0, 0.0]]),
                       torch.tensor([[1.0, 1.0, 0.0]]), kl_coef=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.1, 2.0, 0.0]]))
    w = whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    # Clipped policy loss: A = 1, ratio e^0.5 -> max(-e^0.5, -1.2) = -1.2 ; A = -1, ratio e^0.5 -> max(e^0.5, 1.2) = e^0.5.
    out = ppo_loss(torch.tensor([[0.5, 0.5]]), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.zeros(1, 2), torch.zeros(1, 2),
                   torch.zeros(1, 2), mask, clip_range=0.2, value_clip=0.2)
    assert float(out.metrics["policy_loss"]) == pytest.approx(-1.2 + math.exp(0.5), rel=1e-6)
    assert float(out.metrics["clip_frac"]) == 2.0 and out.n_targets == 2
    # Value loss: V = 1, V_old = 0, return 1 -> unclipped 0, clipped (0.2 - 1)^2 -> 0.5 * max = 0.32.
    out = ppo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1),
                   torch.ones(1, 1), torch.ones(1, 1), clip_range=0.2, value_clip=0.2)
    assert float(out.metrics["value_loss"]) == pytest.approx(0.32, rel=1e-6)
    assert float(out.loss_sum) == pytest.approx(0.5 * 0.32, rel=1e-6)


def test_reward_hacking_warning():
    calm = [{"step": i, "reward_mean": 0.1 * i, "kl": 1.0} for i in range(1, 8)]
    assert reward_hacking_warning(calm, kl_warn=5.0) is None
    runaway = [{"step": i, "reward_mean": 0.1 * i, "kl": 2.0 * i} for i in range(1, 8)]
    msg = reward_hacking_warning(runaway, kl_warn=5.0)
    assert msg and "kl_coef" in msg and "iteration 7" in msg
    falling = [{"step": i, "reward_mean": -0.1 * i, "kl": 2.0 * i} for i in range(1, 8)]
    assert reward_hacking_warning(falling, kl_warn=5.0) is None


def test_grpo_run_end_to_end_with_a_classifier_reward(tmp_path):
    """`gemcut train` path: a tiny classifier run is the reward; a GRPO run on a tiny Llama folder trains,
    logs held-out reward, saves final/ (the LoRA adapter) and a checkpoint that `load_run` reads back."""
    import random

    from tiny import save_tiny_bert, save_tiny_llama

    from gemcut.models.load import load_run
    from gemcut.train.run import train

    rng = random.Random(0)
    pool = "the quick brown fox jumps over lazy dog hello world paris capital france weather okay today love hate wait".split()
    data = tmp_path / "tweets.jsonl"  # distinct random sentences (the leakage check drops near-duplicates across splits)
    data.write_text("".join(json.dumps({"text": " ".join(rng.sample(pool, 7)), "label": rng.choice(["positive", "negative"])}) + "\n"
                            for _ in range(40)))
    common = {"data": {"train": [str(data)], "split": {"validation": 0.2, "test": 0.0}, "max_length": 32},
              "train": {"max_steps": 2, "batch_size": 4, "num_threads": 1, "save_every": 1},
              "eval": {"max_examples": 2}, "output": {"dir": str(tmp_path / "runs")}}
    clf = RunConfig.model_validate({**common, "model": {"name": str(save_tiny_bert(tmp_path / "bert", num_labels=2))},
                                    "adapter": {"method": "full"}, "objective": {"kind": "classify"},
                                    "output": {"dir": str(tmp_path / "runs"), "name": "clf"}})
    clf_dir = train(clf)
    rl = RunConfig.model_validate({**common, "model": {"name": str(save_tiny_llama(tmp_path / "llama"))},
                                   "objective": {"kind": "grpo", "rl": {"reward_model": str(clf_dir), "reward_label": "positive",
                                                                        "prompt_words": 3, "group_size": 2, "max_new_tokens": 4}},
                                   "output": {"dir": str(tmp_path / "runs"), "name": "grpo"}})
    run_dir = train(rl)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "reward_mean" in x] == [1, 2]
    assert all(0 <= x["reward_mean"] <= 1 for x in lines if "reward_mean" in x)  # a probability
    val = [x for x in lines if "val_reward_mean" in x]
    assert len(val) == 1 and val[0]["val_prompts"] == 2
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples[0]["prompt"].split()) == 3  # prompt_words
    for checkpoint in ("final", "step-2"):
        loaded = load_run(run_dir, checkpoint)
        assert loaded.task == "grpo" and hasattr(loaded.model, "disable_adapter") and loaded.value_head is None
    # PPO: the value head is saved with the policy, in checkpoints and final/, and load_run attaches it
    ppo = rl.model_copy(update={"objective": rl.objective.model_copy(update={"kind": "ppo"}),
                                "output": rl.output.model_copy(update={"name": "ppo"})})
    ppo_dir = train(ppo)
    assert (ppo_dir / "final" / "value_head.safetensors").is_file()
    heads = [load_run(ppo_dir, checkpoint).value_head for checkpoint in ("final", "step-2", "step-1")]
    assert all(h is not None for h in heads) and heads[0].proj.weight.abs().sum() > 0  # trained off its zero start
    torch.testing.assert_close(heads[0].state_dict(), heads[1].state_dict())  # final/ is the last step's
    assert not torch.equal(heads[1].proj.weight, heads[2].proj.weight)
    # a classifier used as a reward without a label names the labels it has
    from gemcut.errors import ConfigError
    from gemcut.objectives.reward_functions import load_reward

    with pytest.raises(ConfigError, match="positive"):
        load_reward(rl.objective.rl.model_copy(update={"reward_label": None}))


# Per-iteration (loss, reward mean, KL, gradient norm) of 3 iterations, fp32, with each completion sampled from
# a seed of its own (rollouts.row_seeds, so that any number of processes draws the same samples). With one
# seed per batch, the one loop gave exactly the figures of the separate RL loop it replaced (train/rl.py;
# see this test at commit a7f33f7).
PINNED = {
    "grpo": [(-0.043438, 1.083333, 0.0, 0.17162), (-0.040159, 1.583333, 0.066045, 0.172827), (-0.047456, 0.416667, 0.30543, 0.336163)],
    "ppo": [(0.499421, 1.083333, 0.0, 0.703169), (0.965388, 1.666667, 0.016816, 1.603677), (0.069245, 0.416667, 0.221475, 0.475682)],
}


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_pinned_per_iteration_figures(algo, tmp_path):
    policy, tok = make_policy()
    cfg = RunConfig.model_validate({
        "objective": {"kind": algo, "rl": {"group_size": 4, "max_new_tokens": 6, "kl_coef": 0.01, "ppo_epochs": 2}},
        "train": {"max_steps": 3, "batch_size": 3, "micro_batch_size": 2, "lr": 1e-2, "schedule": "constant", "warmup_steps": 0,
                  "precision": "fp32"},
        "output": {"dir": str(tmp_path)}})
    fit_rl(policy, tok, prompt_inputs([{"text": p} for p in PROMPTS], tok), count_reward, algo=algo, config=cfg, run_dir=tmp_path / "r")
    got = [(x["loss"], x["reward_mean"], x["kl"], x["grad_norm"]) for x in history(tmp_path / "r")]
    assert len(got) == 3
    for step, (g, want) in enumerate(zip(got, PINNED[algo]), 1):
        assert g == pytest.approx(want, rel=1e-3, abs=2e-5), (step, g, want)


def test_rl_runs_keep_the_best_checkpoint_and_stop_early_on_the_held_out_reward(tmp_path):
    """The one loop gives RL what SFT has: the watched metric (auto: val_reward_mean, higher is better) picks
    the best checkpoint, and patience stops the run."""
    policy, tok = make_policy()
    prompts = prompt_inputs([{"text": t} for t in PROMPTS], tok)
    held_out = prompt_inputs([{"text": "nothing special"}, {"text": "paris is"}], tok)
    cfg = config("grpo", 12, tmp_path, eval_every=2, early_stopping={"patience": 2})
    result = fit_rl(policy, tok, prompts, count_reward, algo="grpo", config=cfg, run_dir=tmp_path / "r", val_prompts=held_out)
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [(x["step"], x["val_reward_mean"]) for x in lines if "val_reward_mean" in x]
    best_step, best = evals[0]
    since, stop = 0, None
    for step, value in evals[1:]:
        if value > best:
            best_step, best, since = step, value, 0
        else:
            since += 1
            if since >= 2 and step < 12:
                stop = step
                break
    assert result.state.best_metric == pytest.approx(best) and result.state.best_step == best_step
    assert result.best_checkpoint.name == f"step-{best_step}"
    assert (result.stopped, result.state.step) == (("early_stopped", stop) if stop else ("completed", 12))
