"""Scoring passes: batched per-sequence NLL equals the training objective on each sequence alone."""

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_bert_classifier, tiny_llama, tiny_tokenizer

from gemcut.eval import scoring
from gemcut.objectives.causal_lm import CausalLM

torch.set_num_threads(1)


def test_sequence_nll_equals_objective_per_sequence():
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=2)
    texts = ["hello world, this is a tiny corpus.", "i love this", "the quick brown fox jumps over the lazy dog.", "a", "okay"]
    ids = [tok(t)["input_ids"] for t in texts]
    # Targets: the second half of each sequence (like an answer after a prompt); "a" has one token, no target.
    masks = [[i >= len(x) // 2 for i in range(len(x))] for x in ids]
    from gemcut.generation import accepts_logits_to_keep

    assert accepts_logits_to_keep(model)  # the head-on-target-positions path is the one under test
    got = scoring.sequence_nll(model, ids, masks, batch_size=2)
    for seq, mask, (nll, count) in zip(ids, masks, got):
        if len(seq) < 2:
            assert (nll, count) == (0.0, 0)
            continue
        x = torch.tensor([seq])
        batch = {"input_ids": x, "labels": x.masked_fill(~torch.tensor([mask]), -100), "attention_mask": torch.ones_like(x)}
        ref = CausalLM()(model, batch)
        assert count == ref.n_targets == sum(mask[1:])
        assert nll == pytest.approx(float(ref.loss_sum), rel=1e-5)
    advanced = []
    scoring.sequence_nll(model, ids, masks, batch_size=2, progress=advanced.append)
    assert sum(advanced) == len(ids)


def test_predict_classes_and_loss():
    tok = tiny_tokenizer()
    model = tiny_bert_classifier(tok, num_labels=3, seed=1)
    ids = [tok(t)["input_ids"] for t in ["i love this", "i hate waiting, this is terrible", "okay"]]
    preds, nll = scoring.predict_classes(model, tok, ids, [0, 1, 2], batch_size=2)
    for seq, p, (loss, one), y in zip(ids, preds, nll, [0, 1, 2]):
        logits = model(input_ids=torch.tensor([seq])).logits
        assert p == int(logits.argmax())
        assert one == 1 and loss == pytest.approx(float(F.cross_entropy(logits, torch.tensor([y]))), rel=1e-5)
