"""The rollout source: GRPO's and PPO's batches, sampled by the policy and scored by a reward.

    gemcut train examples/grpo_sentiment.yaml      # objective.kind: grpo (or ppo)
    python -m pytest -q tests/test_rl.py

RL runs through the same loop as every other objective (gemcut/train/loop.py); what differs is where the
batches come from. One step (an "iteration") of `RolloutSource`:
  1. take `train.batch_size` prompts from the epoch's seeded order (the order every source uses);
  2. sample `rl.group_size` completions of each, all in one batched call to `gemcut.generation.generate`,
     seeded by (train.seed, step) so a resumed run draws the same completions;
  3. score them with the reward function (gemcut/objectives/reward_functions.py), which may read each
     prompt's data row (`item`: an OpenAI grader's {{item.x}}, gemcut/objectives/graders.py);
  4. with no gradient: log-probs of the sampled tokens under the policy (pi_old), under the reference (the
     same model with its adapter disabled) and, for PPO, the value head's estimates;
  5. GRPO: group-standardised rewards as advantages (objectives/grpo.py); PPO: KL-shaped per-token rewards,
     GAE, whitened advantages (objectives/ppo.py);
  6. hand the loop `rl.ppo_epochs` updates over the same rollouts, each in micro-batches of whole groups
     (`train.micro_batch_size` prompts' completions).
On several processes each samples the groups of its share of the prompts; every completion is seeded by its
prompt's place in the step (`row_seeds`), so the samples, rewards and advantages are those of one process.
Each step logs reward mean/std, KL to the reference, entropy, response length and generation time with a few
samples, and warns when the reward keeps rising while the KL runs past `rl.kl_warn` (reward hacking).
`RewardValidation` scores held-out prompts for the policy and the reference at each evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gemcut.config import RLConfig, RunConfig, TrainConfig
from gemcut.errors import TrainingError
from gemcut.generation import generate
from gemcut.objectives.dpo import reference
from gemcut.objectives.grpo import group_advantages
from gemcut.objectives.ppo import gae, shaped_rewards, whiten
from gemcut.objectives.reward_functions import RewardFn, score
from gemcut.objectives.rollout_forward import rollout_forward
from gemcut.tasks import Task
from gemcut.train.batches import Step, deal, epoch_order
from gemcut.train.distributed import Group, micro_batch_size
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
    """RL prompts from data records: {"prompt": text shown in logs, "input_ids": what the policy continues,
    "item": the record's row fields for a grader (None without), "source": its file:line}.

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
        out.append({"prompt": shown, "input_ids": ids, "item": rec.get("item"), "source": rec.get("_source")})
    return out


def row_seeds(seed: int, prompt_positions: Sequence[int], group_size: int) -> list[int]:
    """One sampling seed per completion: completion k of the prompt at `position` gets its own, so what it
    samples does not depend on which process, or which batch, it is generated in."""
    return [(((seed * 1_000_003) + p) * 1_009 + k) % 2**63 for p in prompt_positions for k in range(group_size)]


def _policy(model: torch.nn.Module) -> torch.nn.Module:
    """The model that samples: the policy itself, or the policy inside a PolicyWithValueHead."""
    return getattr(model, "policy", model)


def collect(policy, tokenizer, prompts: Sequence[dict], reward_fn: RewardFn, *, group_size: int, max_new_tokens: int,
            temperature: float, top_p: float, seed: int | list[int]) -> Rollouts:
    """Sample `group_size` completions of each prompt (consecutive rows form a group) and score them. `seed`:
    one for the batch, or one per completion (`row_seeds`)."""
    rows = [p for p in prompts for _ in range(group_size)]
    results = generate(policy, tokenizer, [p["input_ids"] for p in rows], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=seed)
    eos = tokenizer.eos_token_id
    gen = []
    for r in results:
        # A completion that ended on end-of-sequence trains that token too, so the policy learns to stop.
        gen.append(list(r.token_ids) + ([eos] if r.finish_reason == "stop" and eos is not None else []))
    texts = [r.text for r in results]
    # Each completion is scored with its own prompt's row (a grader's {{item.x}}).
    scored = score(reward_fn, [p["prompt"] for p in rows], texts, gen, [p.get("item") for p in rows])
    rewards = torch.as_tensor(scored, dtype=torch.float32).reshape(-1).cpu()
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

    def __init__(self, prompts: Sequence[dict], tokenizer, reward_fn: RewardFn, rl: RLConfig, train: TrainConfig, *,
                 value_head: bool):
        if not prompts:
            raise TrainingError("no prompts to train on: data.train gave no records")
        self.prompts, self.tokenizer, self.reward_fn, self.rl, self.train = prompts, tokenizer, reward_fn, rl, train
        self.per_iter, self.seed, self.ppo = min(train.batch_size, len(prompts)), train.seed, value_head
        self.updates_per_step = rl.ppo_epochs
        self.lengths = [len(p["input_ids"]) for p in prompts]
        self.history: list[dict] = []
        self.warned_at = -HACK_WINDOW

    def __len__(self) -> int:
        return len(self.prompts)

    def examples_per_step(self) -> int:
        return self.per_iter

    def step(self, model, *, epoch: int, index: int, step: int, group: Group) -> Step:
        rl, dev = self.rl, next(model.parameters()).device
        order = epoch_order(self.lengths, seed=self.seed, epoch=epoch, batch_size=self.per_iter, group_by_length=False)
        take = order[index:index + self.per_iter]
        # This process's prompts: micro-batches of prompts dealt round-robin; each keeps its place in the step.
        chunks, weights = deal(list(range(len(take))), micro_batch_size(self.train, group.world), group, even=False)
        zero = weights == [0.0]  # this process got no prompt: it samples a filler that adds nothing
        places = [i for chunk in chunks for i in chunk]
        t0 = time.time()
        was_training = model.training
        model.eval()
        ro = collect(_policy(model), self.tokenizer, [self.prompts[take[i]] for i in places], self.reward_fn,
                     group_size=rl.group_size, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                     top_p=rl.top_p, seed=row_seeds(self.seed * 1_000_003 + step - 1, places, rl.group_size))
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
            # Whitened over the whole step's tokens, on every process alike (a zero-weight share adds nothing).
            weight = 0.0 if zero else 1.0
            batch.update(advantages=whiten(advantages, mask, moments=lambda m: group.sum(m * weight)), returns=returns,
                         old_values=old_values)
        else:
            batch.update(advantages=group_advantages(rewards, rl.group_size))
        # Micro-batches of whole groups, one per chunk of prompts; the loop divides each by the update's targets.
        bounds = [0]
        for chunk in chunks:
            bounds.append(bounds[-1] + len(chunk) * rl.group_size)
        micro = [{k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds, bounds[1:])]
        n = ro.ids.shape[0]
        kl = ((old_logp - ref_logp) * mask).sum(-1)  # log pi/ref of each sampled completion
        metrics = self._step_metrics(ro, kl, entropy, mask, group, zero)
        metrics["gen_s"] = round(gen_s, 3)
        self.history.append({"step": step, **metrics})  # the same on every process
        warnings = []
        warning = reward_hacking_warning(self.history, rl.kl_warn)
        if warning and step - self.warned_at >= HACK_WINDOW:  # once per window, not every iteration
            self.warned_at = step
            warnings.append(warning)
        shown = [{"prompt": ro.prompts[i], "output": ro.completions[i], "reward": float(ro.rewards[i])}
                 for i in range(0, n, max(1, rl.group_size))[:SAMPLES_PER_ITER]] if group.main else []
        return Step([micro] * rl.ppo_epochs, len(take), 0 if zero else int(ro.attention_mask.sum()), metrics, shown,
                    warnings, trained_tokens=0 if zero else int(ro.mask.sum()), weights=weights)

    @staticmethod
    def _step_metrics(ro: Rollouts, kl: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, group: Group,
                      zero: bool) -> dict[str, float]:
        """Reward, KL, entropy and length over the whole step's completions, on every process alike."""
        w = 0.0 if zero else 1.0
        r = ro.rewards.double()
        totals = group.sum(torch.tensor([len(r) * w, float(r.sum()) * w, float((r * r).sum()) * w, float(kl.sum()) * w,
                                         float((entropy * mask).sum()) * w, float(mask.sum()) * w], dtype=torch.float64))
        n, rsum, rsq, klsum, ent, tokens = totals.tolist()
        mean = rsum / max(n, 1)
        return {"reward_mean": mean, "reward_std": max(rsq / max(n, 1) - mean * mean, 0.0) ** 0.5, "kl": klsum / max(n, 1),
                "entropy": ent / max(tokens, 1), "response_len": tokens / max(n, 1)}


class RewardValidation(Validation):
    """Held-out reward of the policy and of the reference (the same model, adapter off) on the same prompts
    and seeds, the KL of the policy's samples to the reference, and a few side-by-side samples. On several
    processes each samples its share of the prompts (each completion seeded by its prompt's place) and the
    sums are added up."""

    def __init__(self, prompts: Sequence[dict], tokenizer, reward_fn: RewardFn, rl: RLConfig, *, seed: int):
        self.prompts, self.tokenizer, self.reward_fn, self.rl, self.seed = prompts, tokenizer, reward_fn, rl, seed

    @torch.no_grad()
    def __call__(self, model, group: Group) -> tuple[dict[str, float], list[dict]]:
        rl, policy = self.rl, _policy(model)
        places = group.share(list(range(len(self.prompts))))
        weight = 1.0 if places else 0.0
        places = places or [0]  # a process without a prompt samples the first with weight 0 (same collectives)
        prompts = [self.prompts[i] for i in places]
        kw = dict(group_size=rl.group_size, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                  top_p=rl.top_p, seed=row_seeds(self.seed + VALIDATION_SEED_OFFSET, places, rl.group_size))
        model.eval()
        ro = collect(policy, self.tokenizer, prompts, self.reward_fn, **kw)
        with reference(policy):
            ro_ref = collect(policy, self.tokenizer, prompts, self.reward_fn, **kw)
        batch = ro.batch(next(policy.parameters()).device)
        logp, _, _ = rollout_forward(policy, batch)
        with reference(policy):
            ref_logp, _, _ = rollout_forward(policy, batch)
        model.train()
        kl = ((logp - ref_logp) * batch["mask"]).sum(-1)
        r, r_ref = ro.rewards.double(), ro_ref.rewards.double()
        n, rsum, rsq, ref_sum, kl_sum, tokens = (group.sum(torch.tensor(
            [len(r), float(r.sum()), float((r * r).sum()), float(r_ref.sum()), float(kl.sum()), float(ro.mask.sum())],
            dtype=torch.float64) * weight)).tolist()
        mean = rsum / max(n, 1)
        shown = [{"split": "validation", "prompt": ro.prompts[i], "output": ro.completions[i], "reward": float(ro.rewards[i]),
                  "reference_output": ro_ref.completions[i], "reference_reward": float(ro_ref.rewards[i])}
                 for i in range(0, len(ro.prompts), max(1, rl.group_size))[:SAMPLES_PER_ITER]] if group.main else []
        metrics = {"val_reward_mean": mean, "val_reward_std": max(rsq / max(n, 1) - mean * mean, 0.0) ** 0.5,
                   "val_reward_ref": ref_sum / max(n, 1), "val_kl": kl_sum / max(n, 1),
                   "val_response_len": tokens / max(n, 1), "val_prompts": len(self.prompts)}
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
    check_items = getattr(reward_fn, "check_items", None)
    if check_items is not None:  # a grader reads fields of each row: a row without one stops the run before sampling
        check_items([*prompts, *(val_prompts or [])])
    source = RolloutSource(prompts, tokenizer, reward_fn, rl, cfg, value_head=ppo)
    validation = None
    if val_prompts:
        validation = RewardValidation(list(val_prompts)[: config.eval.max_examples or None], tokenizer, reward_fn, rl, seed=cfg.seed)
    return source, validation, PolicyWithValueHead(policy) if ppo else policy
