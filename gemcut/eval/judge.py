"""A pairwise judge for generation tasks: a reward-model run scores the tuned model's answer and a baseline's.

    gemcut eval runs/<sft-run> eval.judge=runs/<reward-run>
    python -m pytest -q tests/test_eval_baselines.py -k judge

ROUGE and BLEU reward overlap with one reference; a chat task has many good answers. Where the user has a
reward model (a `gemcut train objective.kind=reward` run), `eval.judge` names it and each test prompt's two
answers, the tuned model's and a baseline's (the base zero-shot, the base k-shot), are scored by it, each
rendered as the conversation prompt + answer by the judge's own chat template. The tuned model wins a prompt
when its answer scores higher; a tie (the same answer, or the same score) counts half. The win rate gets a bootstrap interval over prompts
(bootstrap.py, `eval.bootstrap` resamples, seed `train.seed`); 0.5 is "no better than the baseline".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from gemcut.errors import ConfigError
from gemcut.eval import scoring
from gemcut.eval.bootstrap import paired_bootstrap_indexed
from gemcut.eval.examples import Example
from gemcut.tasks import task_named


def load_judge(path: str | Path, device, *, trust_remote_code: bool = False):
    """The reward-model run at `path` (its final model) on `device`; ConfigError when it is not a reward run."""
    from gemcut.models.load import load_run

    if not (Path(path) / "config.yaml").is_file():
        raise ConfigError(f"eval.judge={path}: not a run folder (no config.yaml); name a run trained with objective.kind=reward")
    judge = load_run(path, trust_remote_code=trust_remote_code)
    if task_named(judge.task).head != "scorer":
        raise ConfigError(f"eval.judge={path}: a {judge.task} run, not a reward model; name a run trained with objective.kind=reward")
    if judge.template is None:
        raise ConfigError(f"eval.judge={path}: the reward run has no chat template to render prompt and answer with")
    judge.model.to(device)
    judge.model.eval()
    return judge


def judge_scores(judge, examples: list[Example], answers: list[str], *, max_length: int, batch_size: int = 16,
                 progress: Callable[[int], None] | None = None) -> list[float]:
    """The judge's score of each answer to its example's prompt."""
    rows = [judge.template.render([*e.prompt, {"role": "assistant", "content": a}])[0][:max_length]
            for e, a in zip(examples, answers)]
    return scoring.reward_scores(judge.model, judge.tokenizer, rows, batch_size=batch_size, progress=progress)


def pairwise(tuned: list[float], other: list[float], same: list[bool] | None = None, *, n_resamples: int = 1000,
             seed: int = 0) -> dict:
    """{win_rate, low, high, half_width, wins, ties, losses, tuned_mean, other_mean, n}: how often the tuned
    answer scores above the other one (a tie counts half), with its bootstrap interval over prompts.

    `same[i]`: the two answers are the same text, a tie whatever the scores (batches padded differently give
    the same text scores that differ in the last float bits)."""
    t, o = np.asarray(tuned, dtype=float), np.asarray(other, dtype=float)
    tie = (t == o) | (np.asarray(same, dtype=bool) if same is not None else False)
    win, loss = (t > o) & ~tie, (t < o) & ~tie
    points = win + 0.5 * tie
    ci = paired_bootstrap_indexed(lambda idx: float(points[idx].mean()), lambda idx: 0.0, len(points),
                                  n_resamples=n_resamples, seed=seed)
    return {"win_rate": ci["tuned"], "low": ci["low"], "high": ci["high"], "half_width": ci["half_width"],
            "wins": int(win.sum()), "ties": int(tie.sum()), "losses": int(loss.sum()),
            "tuned_mean": float(t.mean()) if len(t) else None, "other_mean": float(o.mean()) if len(o) else None, "n": len(points)}


def judge_baselines(path: str | Path, device, examples: list[Example], tuned_texts: list[str], others: dict[str, list[str]], *,
                    batch_size: int = 16, n_resamples: int = 1000, seed: int = 0, trust_remote_code: bool = False,
                    progress=None) -> dict:
    """{run, max_length, vs: {name: pairwise(...)}}: the tuned answers against each of `others` (name -> answers)."""
    judge = load_judge(path, device, trust_remote_code=trust_remote_code)
    max_length = int((judge.config.get("data") or {}).get("max_length") or 512)

    def scores(texts: list[str], name: str) -> list[float]:
        return judge_scores(judge, examples, texts, max_length=max_length, batch_size=batch_size,
                            progress=progress(f"judge: {name}", len(texts)) if progress else None)

    tuned = scores(tuned_texts, "tuned")
    vs = {name: pairwise(tuned, scores(texts, name), [a == b for a, b in zip(tuned_texts, texts)], n_resamples=n_resamples, seed=seed)
          for name, texts in others.items()}
    return {"run": str(path), "max_length": max_length, "vs": vs}
