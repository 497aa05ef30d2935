"""Paraphrases of training prompts, written by a model through gemcut's one sampler (`data.augment.paraphrase`).

    python -m pytest -q tests/test_augment.py -k paraphrase
    gemcut train examples/mixture_sentiment_chat.yaml data.augment.paraphrase.model=smollm2-135m-instruct

The data layer chooses which records get a paraphrase and checks each for leakage (gemcut/data/augment.py); it
sits below the models, so `gemcut train` hands `prepare` the `ModelParaphraser` made here. The model is a model
name (an alias, hub id or local folder, asked through its tokenizer's chat template, else the plain template)
or a gemcut run folder (its tuned model and template), loaded on the first call only. Each text is asked with
`instruction` and answered by `gemcut.generation.generate` with a seed drawn from the text and
`data.augment.seed`, so a paraphrase does not depend on the batch it was written in, and preparing the same
data again (a resume checks the data's hash) writes the same paraphrases.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from gemcut.config import AugmentConfig, ModelConfig, ParaphraseConfig


def text_seed(text: str, seed: int) -> int:
    """The sampling seed of one text's paraphrase: a hash of the text and the augmentation seed."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=4).digest(), "little")


class ModelParaphraser:
    """texts -> paraphrases (a `gemcut.data.augment.Paraphraser`), by the model `cfg.model` names."""

    def __init__(self, cfg: ParaphraseConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.model = self.tokenizer = self.template = None
        self.written: dict[str, str] = {}  # text -> paraphrase: a second prepare in the same process asks nothing again

    def load(self) -> None:
        from gemcut.data.templates import ChatTemplate
        from gemcut.models.load import load_base, load_run

        if (Path(self.cfg.model) / "gemcut_run.json").is_file():
            loaded = load_run(self.cfg.model)
            self.model, self.tokenizer, self.template = loaded.model, loaded.tokenizer, loaded.template
        else:
            self.model, self.tokenizer = load_base(ModelConfig(name=self.cfg.model), "causal_lm")
            own = getattr(self.tokenizer, "chat_template", None)
            self.template = ChatTemplate.from_tokenizer(self.tokenizer, None if own else "plain")
        if self.template is None:
            raise ValueError(f"data.augment.paraphrase.model={self.cfg.model}: this run has no chat template to ask it with; "
                             "name a causal language model or an SFT run")
        self.model.eval()

    def __call__(self, texts: list[str]) -> list[str]:
        from gemcut.generation import default_eos_ids, generate_messages

        todo = list(dict.fromkeys(t for t in texts if t not in self.written))
        if todo:
            if self.model is None:
                self.load()
            eos = default_eos_ids(self.model, self.tokenizer) | set(getattr(self.template, "stop_token_ids", []) or [])
            asks = [[{"role": "user", "content": self.cfg.instruction.replace("{text}", t)}] for t in todo]
            results = generate_messages(self.model, self.tokenizer, self.template, asks, max_new_tokens=self.cfg.max_new_tokens,
                                        temperature=self.cfg.temperature, seed=[text_seed(t, self.seed) for t in todo],
                                        batch_size=self.cfg.batch_size, eos_ids=eos)
            self.written.update({t: r.text.strip() for t, r in zip(todo, results)})
        return [self.written[t] for t in texts]


def model_paraphraser(augment: AugmentConfig) -> ModelParaphraser | None:
    """The paraphraser `data.augment.paraphrase` asks for, or None when it asks for none."""
    return None if augment.paraphrase is None else ModelParaphraser(augment.paraphrase, augment.seed)
