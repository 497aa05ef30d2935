"""The baselines a tuned model is compared with: what the user could have had without fine-tuning.

    python -m pytest -q tests/test_eval_baselines.py

`eval.baselines` (default all three) and `eval.k_shot` (default 4) choose them; evaluate.py runs them and
baseline_summary.py compares each with the tuned model. Which apply:

| baseline    | label task (generative classifier or classifier head)              | generation task (SFT)                  |
|-------------|--------------------------------------------------------------------|----------------------------------------|
| `zero_shot` | the base causal LM, the label set named in the prompt, answer by constrained label likelihood (constrained.py) | the base model's answers (eval's `base`) |
| `k_shot`    | the same with k train examples, balanced over labels, as earlier turns | k train examples as earlier turns, greedy answers |
| `tfidf`     | TF-IDF + logistic regression on the train split (tfidf.py)         | does not apply                          |

A classifier-head run's base is prompted only when it is a causal LM (`model_views.causal_base_of`); an
encoder such as MiniLM gets TF-IDF alone, and eval.json says why. Language modelling and preference runs
have no baselines here (their base comparison is eval's `base`).

Few-shot examples come from the run's prepared train split with seed `train.seed`, among the shorter half
of it (a prompt of k long examples would cost more than the evaluation it serves); the same k examples are
shown before every test example, so the rows of a batch share them as one prefix (shared_prefix.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from gemcut.config import RunConfig
from gemcut.eval.constrained import constrained_labels, with_label_set
from gemcut.eval.examples import Example
from gemcut.eval.summary import ModelResults
from gemcut.eval.task_scoring import Progress, no_progress, score_model

ALL = ("zero_shot", "k_shot", "tfidf")
TITLES = {"zero_shot": "base zero-shot", "k_shot": "base {k}-shot", "tfidf": "TF-IDF + logistic regression",
          "base": "base (free text)"}


@dataclass
class Baseline:
    """One baseline's answers to the evaluated examples, aligned with them, and how they were made."""

    name: str  # zero_shot | k_shot | tfidf
    title: str  # what the report calls it
    how: str  # one sentence: how it answered and how it was scored
    results: ModelResults
    info: dict = field(default_factory=dict)


def wanted(task: str, cfg: RunConfig) -> list[str]:
    """The baselines of `eval.baselines` that apply to the evaluation `task` (module docstring)."""
    requested = list(cfg.eval.baselines if cfg.eval.baselines is not None else ALL)
    if task in ("generative_classification", "classification"):
        return [b for b in ALL if b in requested]
    if task == "generation":
        return [b for b in ("zero_shot", "k_shot") if b in requested]
    return []


def few_shot_examples(train: list[Example], k: int, seed: int, *, by_label: bool) -> list[Example]:
    """k train examples for the prompt, fixed by `seed`: among the shorter half of the split, and with labels
    taken in turn (as evenly as k allows) when `by_label`; in a shuffled order, so no label is always last."""
    if k <= 0 or not train:
        return []
    rng = random.Random(seed)

    def size(e: Example) -> int:
        return sum(len(m["content"]) for m in e.prompt or []) + len(e.reference)

    limit = sorted(size(e) for e in train)[(len(train) - 1) // 2]
    pool = [e for e in train if size(e) <= limit]
    rng.shuffle(pool)
    if not by_label:
        chosen = pool[:k]
    else:
        groups: dict[str, list[Example]] = {}
        for e in pool:
            groups.setdefault(e.reference, []).append(e)
        order = sorted(groups)
        rng.shuffle(order)
        chosen = []
        while len(chosen) < k and any(groups.values()):
            for label in order:
                if groups[label] and len(chosen) < k:
                    chosen.append(groups[label].pop())
    rng.shuffle(chosen)
    return chosen


def with_examples(prompt: list[dict], shots: list[Example], labels: list[str] | None) -> list[dict]:
    """The prompt conversation with each shot as an earlier user turn and its answer; system turns stay first."""
    system = [m for m in prompt if m["role"] == "system"]
    turns: list[dict] = []
    for shot in shots:
        shown = [m for m in shot.prompt or [] if m["role"] != "system"]
        turns += (with_label_set(shown, labels) if labels else shown) + [{"role": "assistant", "content": shot.reference}]
    return system + turns + [m for m in prompt if m["role"] != "system"]


def prompted_label_baselines(names: list[str], model, tokenizer, template, examples: list[Example], train: list[Example],
                             labels: list[str], cfg: RunConfig, progress: Progress = no_progress) -> list[Baseline]:
    """The zero- and k-shot label baselines of `names`, scored by constrained label likelihood on `model`."""
    out = []
    for name in (n for n in ("zero_shot", "k_shot") if n in names):
        shots = few_shot_examples(train, cfg.eval.k_shot, cfg.train.seed, by_label=True) if name == "k_shot" else []
        if name == "k_shot" and not shots:
            continue
        prompts = [with_examples(with_label_set(e.prompt, labels), shots, labels) for e in examples]
        title = TITLES[name].format(k=len(shots))
        predictions, _ = constrained_labels(model, tokenizer, template, prompts, labels, batch_size=cfg.eval.batch_size,
                                            progress=progress(f"{title}: label likelihood", len(prompts)))
        how = ("the base model, the label set named in the prompt"
               + (f", {len(shots)} train examples (balanced over labels) as earlier turns" if shots else "")
               + "; its answer is the label with the highest log-probability after the prompt")
        out.append(Baseline(name, title, how, ModelResults(predictions=predictions),
                            {"k": len(shots), "shots": [s.source for s in shots], "scoring": "constrained label likelihood"}))
    return out


def generation_baselines(names: list[str], model, tokenizer, template, examples: list[Example], train: list[Example],
                         base: ModelResults | None, labels: list[str], cfg: RunConfig, log: Callable[[str], None],
                         progress: Progress = no_progress) -> list[Baseline]:
    """The zero-shot (eval's base answers, not generated twice) and k-shot generation baselines of `names`."""
    out = []
    if "zero_shot" in names and base is not None:
        out.append(Baseline("zero_shot", TITLES["zero_shot"], "the base model's greedy answers to the same prompts",
                            base, {"k": 0, "same_as": "base"}))
    shots = few_shot_examples(train, cfg.eval.k_shot, cfg.train.seed, by_label=False) if "k_shot" in names else []
    if shots:
        title = TITLES["k_shot"].format(k=len(shots))
        shown = [replace(e, prompt=with_examples(e.prompt, shots, None)) for e in examples]
        res = score_model("generation", model, tokenizer, template, shown, labels, cfg, log, progress, title)
        out.append(Baseline("k_shot", title, f"the base model's greedy answers with {len(shots)} train examples as earlier turns",
                            res, {"k": len(shots), "shots": [s.source for s in shots]}))
    return out


def tfidf_baseline(examples: list[Example], train: list[dict], validation: list[dict], labels: list[str], seed: int) -> Baseline:
    """TF-IDF + logistic regression fitted on the train records' text and label (tfidf.py)."""
    from gemcut.eval.tfidf import tfidf_predictions

    def pairs(records: list[dict]) -> tuple[list[str], list[str]]:
        kept = [r for r in records if "label" in r and "text" in r]
        return [str(r["text"]) for r in kept], [str(r["label"]) for r in kept]

    predictions, info = tfidf_predictions(*pairs(train), [e.text or "" for e in examples],
                                          validation=pairs(validation), seed=seed)
    # A label the train split never saw cannot be predicted; one the model does not know cannot be scored.
    predictions = [p if p in labels else None for p in predictions]
    how = (f"scikit-learn TF-IDF (word 1-2 grams) and logistic regression, fitted on the {info['n_train']} train texts, "
           f"C={info['c']:g}" + (" chosen on the validation split" if info["validation_macro_f1"] is not None else " (scikit-learn's default)"))
    return Baseline("tfidf", TITLES["tfidf"], how, ModelResults(predictions=predictions), info)


def train_data(run_dir, kind: str, labels: list[str], cfg: RunConfig) -> tuple[list[Example], list[dict], list[dict]]:
    """(train examples, train records, validation records) of the run's prepared splits, only records of `kind`
    (a mixture's other sources are left out). Raises GemcutError naming the file when the train split is missing."""
    from gemcut.data.records import record_kind
    from gemcut.errors import GemcutError
    from gemcut.eval.examples import read_split, to_example

    train = [r for r in read_split(run_dir, "train") if record_kind(r) == kind]
    try:
        validation = [r for r in read_split(run_dir, "validation") if record_kind(r) == kind]
    except GemcutError:
        validation = []
    if kind == "label":  # a label the model was not trained on cannot be a shot or a TF-IDF class
        train = [r for r in train if str(r.get("label")) in labels]
        validation = [r for r in validation if str(r.get("label")) in labels]
    return [to_example(r, labels=labels, data_cfg=cfg.data) for r in train], train, validation


def prompted_baselines(task: str, names: list[str], model, tokenizer, template, examples: list[Example], train: list[Example],
                       base: ModelResults | None, labels: list[str], cfg: RunConfig, log: Callable[[str], None],
                       progress: Progress = no_progress) -> list[Baseline]:
    """The baselines of `names` that prompt `model` (the base causal LM) for the evaluation `task`."""
    if task == "generation":
        return generation_baselines(names, model, tokenizer, template, examples, train, base, labels, cfg, log, progress)
    if task in ("generative_classification", "classification"):
        return prompted_label_baselines(names, model, tokenizer, template, examples, train, labels, cfg, progress)
    return []
