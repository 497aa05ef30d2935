"""The RL loop: GRPO and PPO on a LoRA policy against a reward function, with checkpoints and exact resume.

    gemcut train examples/grpo_sentiment.yaml      # objective.kind: grpo (or ppo)
    python -m pytest -q tests/test_rl.py

One iteration (an optimizer "step" in the run's bookkeeping):
  1. take `train.batch_size` prompts from the epoch's seeded order (the same order `fit` uses);
  2. sample `rl.group_size` completions of each, all in one batched call to `gemcut.generation.generate`,
     seeded by (train.seed, iteration) so a resumed run draws the same completions;
  3. score them with the reward function (gemcut/objectives/rewards.py);
  4. with no gradient: log-probs of the sampled tokens under the policy (pi_old), under the reference (the
     same model with its adapter disabled) and, for PPO, the value head's estimates;
  5. GRPO: group-standardised rewards as advantages (objectives/grpo.py); PPO: KL-shaped per-token rewards,
     GAE, whitened advantages (objectives/ppo.py);
  6. `rl.ppo_epochs` optimizer steps over the rollouts, each split into `train.grad_accum` micro-batches
     whose summed losses are divided by the whole step's target count (the loop's convention).
Every iteration logs reward mean/std, KL to the reference, entropy, clip fraction, response length and a few
samples, and warns when the reward keeps rising while the KL runs past `rl.kl_warn` (reward hacking).
Checkpoints are `gemcut.train.checkpoint`'s (policy adapter + value head as the trainable weights).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gemcut.config import RunConfig
from gemcut.errors import TrainingError
from gemcut.generation import generate
from gemcut.objectives.dpo import reference, token_logps
from gemcut.objectives.grpo import group_advantages, grpo_loss
from gemcut.objectives.ppo import gae, ppo_loss, shaped_rewards, whiten
from gemcut.objectives.rewards import RewardFn
from gemcut.train import checkpoint as ckpt
from gemcut.train import guard
from gemcut.train.logging import RunLogger
from gemcut.train.loop import epoch_order, resolve_precision
from gemcut.train.optimizer import adamw, param_groups
from gemcut.train.schedule import build_scheduler, warmup_steps_for

Algo = Literal["grpo", "ppo"]
SAMPLES_PER_ITER = 3  # generations written to samples.jsonl each iteration
HACK_WINDOW = 5  # iterations over which "reward rising while KL runs away" is judged


class ValueHead(torch.nn.Module):
    """V(state) = w . h_t + b on the policy's last hidden state (shared trunk). Zero-initialised, so the first
    advantages are the raw returns and the head's start does not depend on the RNG."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


class _PolicyAndValue(torch.nn.Module):
    """What PPO trains, for checkpoints: the policy's parameters under their own names (so a checkpoint lines
    up with the LoRA model `load_run` rebuilds) plus the value head's as `value_head.*`."""

    def __init__(self, policy: torch.nn.Module, value_head: ValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from self.policy.named_parameters(prefix, recurse, remove_duplicate)
        yield from self.value_head.named_parameters(prefix + "value_head", recurse, remove_duplicate)


@dataclass
class Rollouts:
    """One iteration's samples. Prompts are left-padded to a common width P so every completion starts at
    column P; `ids` is [N, P + T], the per-token tensors are [N, T] over generated tokens."""

    prompts: list[str]
    completions: list[str]
    ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    tokens: torch.Tensor  # [N, T] generated ids (padding where mask is 0)
    mask: torch.Tensor  # [N, T] 1 on generated tokens
    rewards: torch.Tensor  # [N]


@dataclass
class RLResult:
    state: ckpt.TrainState
    stopped: str  # "completed" or "interrupted"
    last_checkpoint: Path | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    reason: str = ""  # interrupted: the signal ("SIGINT", "SIGTERM")


def prompt_inputs(records: Sequence[dict], tokenizer, template=None, prompt_words: int | None = None) -> list[dict]:
    """RL prompts from data records: {"prompt": text shown in logs, "input_ids": what the policy continues}.

    `text` and `label` records are continued as raw text, cut to their first `prompt_words` words when set
    (`objective.rl.prompt_words`: a tweet's opening, say); `prompt_completion` records' prompts and
    `messages` records (without a final assistant turn) go through the chat template, ending in the
    assistant header."""
    out = []
    for rec in records:
        if "messages" in rec or "prompt" in rec:
            msgs = list(rec["messages"]) if "messages" in rec else [{"role": "user", "content": rec["prompt"]}]
            if "messages" not in rec and rec.get("system"):
                msgs.insert(0, {"role": "system", "content": rec["system"]})
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
            if template is not None:
                ids = list(template.prompt_ids(msgs))
            else:
                ids = list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
            shown = msgs[-1]["content"] if msgs else ""
        else:
            shown = rec["text"] if prompt_words is None else " ".join(rec["text"].split()[:prompt_words])
            ids = tokenizer(shown)["input_ids"]
        if not ids:
            raise TrainingError(f"{rec.get('_source', 'a record')}: the prompt is empty after tokenization")
        out.append({"prompt": shown, "input_ids": ids})
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def collect(policy, tokenizer, prompts: Sequence[dict], reward_fn: RewardFn, *, group_size: int, max_new_tokens: int,
            temperature: float, top_p: float, seed: int) -> Rollouts:
    """Sample `group_size` completions of each prompt (consecutive rows form a group) and score them."""
    rows = [p for p in prompts for _ in range(group_size)]
    results = generate(policy, tokenizer, [p["input_ids"] for p in rows], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=seed)
    eos = tokenizer.eos_token_id
    gen = []
    for r in results:
        # A completion that ended on end-of-sequence trains that token too, so the policy learns to stop.
        gen.append(list(r.token_ids) + ([eos] if r.finish_reason == "stop" and eos is not None else []))
    texts = [r.text for r in results]
    rewards = torch.as_tensor(reward_fn([p["prompt"] for p in rows], texts, gen), dtype=torch.float32).reshape(-1).cpu()
    if rewards.numel() != len(rows):
        raise TrainingError(f"the reward function returned {rewards.numel()} rewards for {len(rows)} completions")
    if not torch.isfinite(rewards).all():
        raise TrainingError("the reward function returned NaN or inf; check the reward model run")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    P = max(len(p["input_ids"]) for p in rows)
    T = max(1, max(len(g) for g in gen))
    n = len(rows)
    ids = torch.full((n, P + T), pad, dtype=torch.long)
    attn = torch.zeros((n, P + T), dtype=torch.long)
    tokens = torch.full((n, T), pad, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.float32)
    for i, (p, g) in enumerate(zip(rows, gen)):
        pi = p["input_ids"]
        ids[i, P - len(pi):P] = torch.tensor(pi)
        attn[i, P - len(pi):P] = 1
        if g:
            ids[i, P:P + len(g)] = torch.tensor(g)
            tokens[i, :len(g)] = torch.tensor(g)
            attn[i, P:P + len(g)] = 1
            mask[i, :len(g)] = 1
    # Positions count real tokens only (as in generation), so a left-padded row computes what it would alone.
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return Rollouts([p["prompt"] for p in rows], texts, ids, attn, positions, tokens, mask, rewards)


def _forward(policy, ro: Rollouts, rows: slice | torch.Tensor, value_head: ValueHead | None):
    """(log-probs [n,T] of the generated tokens, entropy [n,T], values [n,T] or None) for rows of `ro`."""
    dev = _device(policy)
    T = ro.tokens.shape[1]
    out = policy(input_ids=ro.ids[rows].to(dev), attention_mask=ro.attention_mask[rows].to(dev),
                 position_ids=ro.position_ids[rows].to(dev), use_cache=False, output_hidden_states=value_head is not None)
    # Column P-1+t predicts generated token t.
    logits = out.logits[:, -T - 1:-1].float()
    logp = token_logps(logits, ro.tokens[rows].to(dev))
    probs = torch.softmax(logits, dim=-1)
    entropy = -(probs * torch.log_softmax(logits, dim=-1)).sum(-1)
    values = value_head(out.hidden_states[-1][:, -T - 1:-1]) if value_head is not None else None
    return logp, entropy.detach(), values


@torch.no_grad()
def evaluate_reward(policy, tokenizer, prompts: Sequence[dict], reward_fn: RewardFn, *, samples_per_prompt: int,
                    max_new_tokens: int, temperature: float, top_p: float, seed: int) -> dict:
    """Held-out reward of the policy and of the reference (the same model, adapter off) on the same prompts
    and seed, the KL of the policy's samples to the reference, and a few side-by-side samples."""
    kw = dict(group_size=samples_per_prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    ro = collect(policy, tokenizer, prompts, reward_fn, **kw)
    with reference(policy):
        ro_ref = collect(policy, tokenizer, prompts, reward_fn, **kw)
    policy.eval()
    logp, _, _ = _forward(policy, ro, slice(None), None)
    with reference(policy):
        ref_logp, _, _ = _forward(policy, ro, slice(None), None)
    kl = ((logp - ref_logp) * ro.mask.to(logp.device)).sum(-1)
    step = max(1, samples_per_prompt)
    shown = [{"prompt": ro.prompts[i], "output": ro.completions[i], "reward": float(ro.rewards[i]),
              "reference_output": ro_ref.completions[i], "reference_reward": float(ro_ref.rewards[i])}
             for i in range(0, len(ro.prompts), step)[:SAMPLES_PER_ITER]]
    return {"val_reward_mean": float(ro.rewards.mean()), "val_reward_std": float(ro.rewards.std(unbiased=False)),
            "val_reward_ref": float(ro_ref.rewards.mean()), "val_kl": float(kl.mean()),
            "val_response_len": float(ro.mask.sum(-1).mean()), "val_prompts": len(prompts), "samples": shown}


def reward_hacking_warning(history: Sequence[dict], kl_warn: float, window: int = HACK_WINDOW) -> str | None:
    """A message when, over the last `window` iterations, the reward rose while the KL to the reference
    passed `kl_warn` and at least doubled: the policy may be exploiting the reward model."""
    if len(history) <= window:
        return None
    then, now = history[-window - 1], history[-1]
    if now["reward_mean"] > then["reward_mean"] and now["kl"] > kl_warn and now["kl"] > 2 * max(then["kl"], 1e-6):
        return (f"reward hacking? at iteration {now['step']} the reward rose {then['reward_mean']:.3f} -> {now['reward_mean']:.3f} "
                f"while KL to the reference ran from {then['kl']:.2f} to {now['kl']:.2f} nats (> objective.rl.kl_warn="
                f"{kl_warn}); read samples.jsonl, and raise objective.rl.kl_coef or lower train.lr")
    return None


def fit_rl(policy: torch.nn.Module, tokenizer, prompts: Sequence[dict], reward_fn: RewardFn, *, algo: Algo,
           config: RunConfig, run_dir: Path, data_hash: str = "", resume: bool = False,
           val_prompts: Sequence[dict] | None = None, logger: RunLogger | None = None) -> RLResult:
    """Optimise the LoRA `policy` (a peft model, trained in place) against `reward_fn` on `prompts`
    (from `prompt_inputs`). Writes metrics.jsonl, samples.jsonl, tb/ and checkpoints/ under `run_dir`;
    with `resume`, continues exactly from the newest complete checkpoint. With `val_prompts`, every
    `train.eval_every` iterations and at the end the held-out reward of the policy and of the reference
    are logged (`evaluate_reward`, at the rollout temperature, `eval.max_examples` prompts at most)."""
    if algo not in ("grpo", "ppo"):
        raise TrainingError(f"fit_rl runs grpo or ppo, not {algo!r}")
    if not hasattr(policy, "disable_adapter"):
        raise TrainingError(f"objective.kind={algo} needs a LoRA policy (the reference is the adapter-disabled model); "
                            "set adapter.method=lora")
    if not prompts:
        raise TrainingError("no prompts to train on: data.train gave no records")
    cfg, rl, t0 = config.train, config.objective.rl, time.time()
    torch.manual_seed(cfg.seed)
    dev = _device(policy)
    value_head = None
    if algo == "ppo":
        value_head = ValueHead(policy.get_base_model().config.hidden_size).to(dev)
    trainable = policy if value_head is None else _PolicyAndValue(policy, value_head)
    groups = param_groups(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_lr_decay)
    if not groups:
        raise TrainingError("no trainable parameters: check adapter.target_modules")
    params = [p for g in groups for p in g["params"]]
    optimizer = adamw(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_iter = min(cfg.batch_size, len(prompts))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(prompts) / per_iter)))
    updates = total * rl.ppo_epochs
    scheduler = build_scheduler(optimizer, total_steps=updates, kind=cfg.schedule,
                                warmup=warmup_steps_for(updates, cfg.warmup_steps, cfg.warmup_ratio))
    root, config_dict = Path(run_dir) / "checkpoints", config.model_dump(mode="json")
    state, last_saved = ckpt.start_or_resume(root, resume=resume, data_hash=data_hash, config=config_dict,
                                             model=trainable, optimizer=optimizer, scheduler=scheduler)
    log = logger or RunLogger(run_dir, total_steps=total, start_step=state.step, config=config_dict)
    precision = resolve_precision(cfg.precision, dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    history: list[dict] = []
    lengths = [len(p["input_ids"]) for p in prompts]
    stopped, warned_at = "completed", -HACK_WINDOW

    def save() -> None:
        nonlocal last_saved
        last_saved = ckpt.save_checkpoint(root, model=trainable, optimizer=optimizer, scheduler=scheduler, state=state,
                                          config=config_dict, keep_last_n=cfg.keep_last_n)

    with guard.StopSignals() as interrupt:
        try:
            while state.step < total:
                order = epoch_order(lengths, seed=cfg.seed, epoch=state.epoch, batch_size=per_iter, group_by_length=False)
                take = order[state.index:state.index + per_iter]
                t_iter = time.time()
                ro = collect(policy, tokenizer, [prompts[i] for i in take], reward_fn, group_size=rl.group_size,
                             max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
                             seed=cfg.seed * 1_000_003 + state.step)
                t_gen = time.time() - t_iter
                mask = ro.mask.to(dev)
                policy.eval()
                with torch.no_grad(), autocast:
                    old_logp, entropy, old_values = _forward(policy, ro, slice(None), value_head)
                    with reference(policy):
                        ref_logp, _, _ = _forward(policy, ro, slice(None), None)
                rewards = ro.rewards.to(dev)
                if algo == "grpo":
                    advantages = group_advantages(rewards, rl.group_size)
                else:
                    shaped = shaped_rewards(rewards, old_logp, ref_logp, mask, rl.kl_coef)
                    advantages, returns = gae(shaped, old_values, mask, rl.gamma, rl.lam)
                    advantages = whiten(advantages, mask)
                policy.train()
                n = ro.ids.shape[0]
                # Micro-batches of whole groups; the step's loss is divided by the whole step's targets.
                groups = n // rl.group_size
                per_micro = max(1, math.ceil(groups / cfg.grad_accum)) * rl.group_size
                micro = [slice(s, min(n, s + per_micro)) for s in range(0, n, per_micro)]
                n_targets = n if algo == "grpo" else int(mask.sum())
                sums: dict[str, float] = {}
                for _ in range(rl.ppo_epochs):
                    step_loss = 0.0
                    for rows in micro:
                        with autocast:
                            logp, _, values = _forward(policy, ro, rows, value_head)
                            if algo == "grpo":
                                out = grpo_loss(logp, old_logp[rows], ref_logp[rows], advantages[rows], mask[rows],
                                                clip_range=rl.clip_range, kl_coef=rl.kl_coef)
                            else:
                                out = ppo_loss(logp, old_logp[rows], advantages[rows], values, old_values[rows], returns[rows],
                                               mask[rows], clip_range=rl.clip_range, value_clip=rl.value_clip)
                        (out.loss_sum / max(n_targets, 1)).backward()
                        step_loss += float(out.loss_sum.detach()) / max(n_targets, 1)
                        for k, v in out.metrics.items():
                            sums[k] = sums.get(k, 0.0) + float(v)
                    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    # Each update is checked at once: an RL iteration syncs with the host anyway (rewards, logs).
                    guard.check_finite(state.step + 1, loss=step_loss, grad_norm=float(gnorm), weights=float(guard.weights_max_abs(params)),
                                       params=params, now=state.step + 1, last_good=last_saved,
                                       fix="Lower train.lr or raise objective.rl.kl_coef.")
                state.step, state.index = state.step + 1, state.index + len(take)
                state.tokens += int(ro.attention_mask.sum())
                state.trained_tokens += int(ro.mask.sum())
                if state.index >= len(prompts):
                    state.epoch, state.index = state.epoch + 1, 0
                lens = ro.mask.sum(-1)
                per_seq_kl = ((old_logp - ref_logp) * mask).sum(-1)  # log pi/ref of the sampled completion
                denom = rl.ppo_epochs * (n if algo == "grpo" else max(int(mask.sum()), 1))
                record = {
                    "step": state.step, "epoch": state.epoch, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(gnorm), "reward_mean": float(ro.rewards.mean()), "reward_std": float(ro.rewards.std(unbiased=False)),
                    "kl": float(per_seq_kl.mean()), "entropy": float((entropy * mask).sum() / mask.sum().clamp(min=1)),
                    "clip_frac": sums.get("clip_frac", 0.0) / denom, "response_len": float(lens.mean()),
                    "gen_s": round(t_gen, 3), "iter_s": round(time.time() - t_iter, 3),
                }
                if algo == "ppo":
                    record.update(value_loss=sums["value_loss"] / denom, policy_loss=sums["policy_loss"] / denom,
                                  value_clip_frac=sums["value_clip_frac"] / denom)
                history.append(record)
                log.log(record)
                log.samples(state.step, [{"prompt": ro.prompts[i], "output": ro.completions[i], "reward": float(ro.rewards[i])}
                                         for i in range(0, n, max(1, rl.group_size))[:SAMPLES_PER_ITER]])
                warning = reward_hacking_warning(history, rl.kl_warn)
                if warning and state.step - warned_at >= HACK_WINDOW:  # once per window, not every iteration
                    warned_at = state.step
                    log.print(f"[yellow]warning:[/yellow] {warning}")
                    log.log({"step": state.step, "warning": warning})
                if interrupt.requested:
                    stopped = "interrupted"
                last = state.step == total
                if val_prompts and ((cfg.eval_every and state.step % cfg.eval_every == 0) or last):
                    held_out = list(val_prompts)[: config.eval.max_examples or None]
                    result = evaluate_reward(policy, tokenizer, held_out, reward_fn, samples_per_prompt=rl.group_size,
                                             max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
                                             seed=cfg.seed + 7919)  # one fixed seed: evaluations compare like with like
                    shown = result.pop("samples")
                    log.log({"step": state.step, "split": "validation", **result})
                    log.samples(state.step, [{"split": "validation", **x} for x in shown])
                    policy.train()
                if (cfg.save_every and state.step % cfg.save_every == 0) or last or stopped != "completed":
                    save()
                if stopped != "completed":
                    break
        finally:
            if logger is None:
                log.close()
    if stopped == "interrupted":
        log.print(f"interrupted ({interrupt.requested}): saved {last_saved}")  # the caller prints how to resume
    return RLResult(state, stopped, last_saved, history, time.time() - t0, interrupt.requested or "")
