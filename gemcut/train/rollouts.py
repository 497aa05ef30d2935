"""The rollout source: GRPO's and PPO's batches, sampled by the policy and scored by a reward.

    gemcut train examples/grpo_sentiment.yaml      # objective.kind: grpo (or ppo)
    python -m pytest -q tests/test_rl.py

RL runs through the same loop as every other objective (gemcut/train/loop.py); what differs is where the
batches come from. One step (an "iteration") of `RolloutSource`:
  1. take `train.batch_size` prompts from the epoch's seeded order (the order every source uses);
  2. sample `rl.group_size` completions of each, all in one batched call to `gemcut.generation.generate`,
     seeded by (train.seed, step) so a resumed run draws the same completions;
  3. score them with the reward function (gemcut/objectives/reward_functions.py);
  4. with no gradient: log-probs of the sampled tokens under the policy (pi_old), under the reference (the
     same model with its adapter disabled) and, for PPO, the value head's estimates;
  5. GRPO: group-standardised rewards as advantages (objectives/grpo.py); PPO: KL-shaped per-token rewards,
     GAE, whitened advantages (objectives/ppo.py);
  6. hand the loop `rl.ppo_epochs` updates over the same rollouts, each split into `train.grad_accum`
     micro-batches of whole groups.
Each step logs reward mean/std, KL to the reference, entropy, response length and generation time with a few
samples, and warns when the reward keeps rising while the KL runs past `rl.kl_warn` (reward hacking).
`RewardValidation` scores held-out prompts for the policy and the reference at each evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gemcut.config import RLConfig, RunConfig
from gemcut.errors import TrainingError
from gemcut.generation import generate
from gemcut.objectives.dpo import reference
from gemcut.objectives.grpo import group_advantages
from gemcut.objectives.ppo import gae, shaped_rewards, whiten
from gemcut.objectives.reward_functions import RewardFn
from gemcut.objectives.rollout_forward import rollout_forward
from gemcut.tasks import Task
from gemcut.train.batches import Step, epoch_order
from gemcut.train.validation import Validation

SAMPLES_PER_ITER = 3  # generations written to samples.jsonl each iteration
HACK_WINDOW = 5  # iterations over which "reward rising while KL runs away" is judged
VALIDATION_SEED_OFFSET = 7919  # one fixed seed for every evaluation: evaluations compare like with like


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

    def batch(self, device: torch.device, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
        """The model inputs and completions of `rows`, as a rollout batch (gemcut/objectives/rollout_forward.py)."""
        return {"input_ids": self.ids[rows].to(device), "attention_mask": self.attention_mask[rows].to(device),
                "position_ids": self.position_ids[rows].to(device), "tokens": self.tokens[rows].to(device),
                "mask": self.mask[rows].to(device)}


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


def _policy(model: torch.nn.Module) -> torch.nn.Module:
    """The model that samples: the policy itself, or the policy inside a PolicyWithValueHead."""
    return getattr(model, "policy", model)


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


class RolloutSource:
    """Prompts in the epoch's seeded order; each step samples, scores and prepares one iteration's rollouts
    (the module docstring). `value_head`: PPO, whose model is a PolicyWithValueHead."""

    def __init__(self, prompts: Sequence[dict], tokenizer, reward_fn: RewardFn, rl: RLConfig, *, batch_size: int,
                 grad_accum: int, seed: int, value_head: bool):
        if not prompts:
            raise TrainingError("no prompts to train on: data.train gave no records")
        self.prompts, self.tokenizer, self.reward_fn, self.rl = prompts, tokenizer, reward_fn, rl
        self.per_iter, self.grad_accum, self.seed, self.ppo = min(batch_size, len(prompts)), grad_accum, seed, value_head
        self.updates_per_step = rl.ppo_epochs
        self.lengths = [len(p["input_ids"]) for p in prompts]
        self.history: list[dict] = []
        self.warned_at = -HACK_WINDOW

    def __len__(self) -> int:
        return len(self.prompts)

    def examples_per_step(self, world: int) -> int:
        return self.per_iter

    def step(self, model, *, epoch: int, index: int, step: int, rank: int, world: int) -> Step:
        rl, dev = self.rl, next(model.parameters()).device
        order = epoch_order(self.lengths, seed=self.seed, epoch=epoch, batch_size=self.per_iter, group_by_length=False)
        take = order[index:index + self.per_iter]
        t0 = time.time()
        was_training = model.training
        model.eval()
        ro = collect(_policy(model), self.tokenizer, [self.prompts[i] for i in take][rank::world], self.reward_fn,
                     group_size=rl.group_size, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                     top_p=rl.top_p, seed=self.seed * 1_000_003 + step - 1)
        gen_s = time.time() - t0
        batch = ro.batch(dev)
        mask = batch["mask"]
        with torch.no_grad():
            old_logp, entropy, old_values = rollout_forward(model, batch)
            with reference(model):
                ref_logp, _, _ = rollout_forward(_policy(model), batch)
        model.train(was_training)
        rewards = ro.rewards.to(dev)
        batch.update(old_logp=old_logp, ref_logp=ref_logp)
        if self.ppo:
            advantages, returns = gae(shaped_rewards(rewards, old_logp, ref_logp, mask, rl.kl_coef), old_values, mask, rl.gamma, rl.lam)
            batch.update(advantages=whiten(advantages, mask), returns=returns, old_values=old_values)
        else:
            batch.update(advantages=group_advantages(rewards, rl.group_size))
        # Micro-batches of whole groups; the loop divides each by the whole update's target count.
        n = ro.ids.shape[0]
        per_micro = max(1, math.ceil(n // rl.group_size / self.grad_accum)) * rl.group_size
        micro = [{k: v[s:s + per_micro] for k, v in batch.items()} for s in range(0, n, per_micro)]
        kl = ((old_logp - ref_logp) * mask).sum(-1)  # log pi/ref of each sampled completion
        metrics = {"reward_mean": float(ro.rewards.mean()), "reward_std": float(ro.rewards.std(unbiased=False)),
                   "kl": float(kl.mean()), "entropy": float((entropy * mask).sum() / mask.sum().clamp(min=1)),
                   "response_len": float(mask.sum(-1).mean()), "gen_s": round(gen_s, 3)}
        self.history.append({"step": step, **metrics})
        warnings = []
        warning = reward_hacking_warning(self.history, rl.kl_warn)
        if warning and step - self.warned_at >= HACK_WINDOW:  # once per window, not every iteration
            self.warned_at = step
            warnings.append(warning)
        shown = [{"prompt": ro.prompts[i], "output": ro.completions[i], "reward": float(ro.rewards[i])}
                 for i in range(0, n, max(1, rl.group_size))[:SAMPLES_PER_ITER]]
        return Step([micro] * rl.ppo_epochs, len(take), int(ro.attention_mask.sum()), metrics, shown, warnings,
                    trained_tokens=int(ro.mask.sum()))


class RewardValidation(Validation):
    """Held-out reward of the policy and of the reference (the same model, adapter off) on the same prompts
    and seed, the KL of the policy's samples to the reference, and a few side-by-side samples."""

    def __init__(self, prompts: Sequence[dict], tokenizer, reward_fn: RewardFn, rl: RLConfig, *, seed: int):
        self.prompts, self.tokenizer, self.reward_fn, self.rl, self.seed = prompts, tokenizer, reward_fn, rl, seed

    @torch.no_grad()
    def __call__(self, model) -> tuple[dict[str, float], list[dict]]:
        rl, policy = self.rl, _policy(model)
        kw = dict(group_size=rl.group_size, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                  top_p=rl.top_p, seed=self.seed + VALIDATION_SEED_OFFSET)
        model.eval()
        ro = collect(policy, self.tokenizer, self.prompts, self.reward_fn, **kw)
        with reference(policy):
            ro_ref = collect(policy, self.tokenizer, self.prompts, self.reward_fn, **kw)
        batch = ro.batch(next(policy.parameters()).device)
        logp, _, _ = rollout_forward(policy, batch)
        with reference(policy):
            ref_logp, _, _ = rollout_forward(policy, batch)
        model.train()
        kl = ((logp - ref_logp) * batch["mask"]).sum(-1)
        shown = [{"split": "validation", "prompt": ro.prompts[i], "output": ro.completions[i], "reward": float(ro.rewards[i]),
                  "reference_output": ro_ref.completions[i], "reference_reward": float(ro_ref.rewards[i])}
                 for i in range(0, len(ro.prompts), max(1, rl.group_size))[:SAMPLES_PER_ITER]]
        metrics = {"val_reward_mean": float(ro.rewards.mean()), "val_reward_std": float(ro.rewards.std(unbiased=False)),
                   "val_reward_ref": float(ro_ref.rewards.mean()), "val_kl": float(kl.mean()),
                   "val_response_len": float(ro.mask.sum(-1).mean()), "val_prompts": len(self.prompts)}
        return metrics, shown


def rl_training(task: Task, config: RunConfig, policy: torch.nn.Module, tokenizer, prompts: Sequence[dict], reward_fn: RewardFn,
                val_prompts: Sequence[dict] | None = None) -> tuple[RolloutSource, RewardValidation | None, torch.nn.Module]:
    """What `fit` needs to run GRPO or PPO on `prompts` (from `prompt_inputs`): the rollout source, the held-out
    reward validation (at most `eval.max_examples` prompts) and the module trained (PPO: the policy with its
    value head, gemcut/models/value_head.py)."""
    from gemcut.models.value_head import PolicyWithValueHead

    if not hasattr(policy, "disable_adapter"):
        raise TrainingError(f"objective.kind={task.name} needs a LoRA policy (the reference is the adapter-disabled model); "
                            "set adapter.method=lora")
    cfg, rl, ppo = config.train, config.objective.rl, task.value_head
    source = RolloutSource(prompts, tokenizer, reward_fn, rl, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                           seed=cfg.seed, value_head=ppo)
    validation = None
    if val_prompts:
        validation = RewardValidation(list(val_prompts)[: config.eval.max_examples or None], tokenizer, reward_fn, rl, seed=cfg.seed)
    return source, validation, PolicyWithValueHead(policy) if ppo else policy
