"""A prompt prefix shared by a batch runs once; losses, gradients, NLLs and generations do not change."""

from unittest import mock

import pytest
import torch
from peft import LoraConfig, get_peft_model

import gemcut.generation as generation
import gemcut.objectives.causal_lm as causal_lm
from gemcut.data.collate import IGNORE
from gemcut.eval import scoring
from gemcut.generation import generate
from gemcut.models.shared_prefix import common_prefix_length, shared_prompt_length
from gemcut.objectives.causal_lm import CausalLM
from tests.tiny import tiny_llama, tiny_tokenizer

PREFIX = [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]  # 12 tokens every row starts with


def _batch(suffixes, answer_len=2, pad_id=0):
    """Right-padded rows PREFIX + suffix; the last `answer_len` tokens of each row are targets."""
    rows = [PREFIX + s for s in suffixes]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, len(r) - answer_len:len(r)] = ids[i, len(r) - answer_len:len(r)]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


SUFFIXES = [[60, 61, 62, 63, 64], [70, 71], [80, 81, 82, 83, 84, 85, 86], [90, 91, 92]]


def _loss_and_grads(model, objective, batch):
    model.zero_grad()
    out = objective(model, batch)
    out.loss_sum.backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_training_loss_and_gradients_equal_the_full_forward(lora):
    model = tiny_llama().train()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        torch.manual_seed(1)
        for name, p in model.named_parameters():  # B is zero at init: make the adapter do something
            if "lora_B" in name:
                p.data.normal_(0, 0.1)
    batch = _batch(SUFFIXES)
    with mock.patch.object(causal_lm, "prefix_cache", wraps=causal_lm.prefix_cache) as spy:
        shared_loss, shared_grads = _loss_and_grads(model, CausalLM(), batch)
    # The shortest row's first target follows the prefix at once: the column predicting it runs per row.
    assert spy.call_count == 1 and spy.call_args.args[1].shape == (1, len(PREFIX) - 1)
    full_loss, full_grads = _loss_and_grads(model, CausalLM(share_prefix=False), batch)
    torch.testing.assert_close(shared_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert shared_grads.keys() == full_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_no_sharing_with_dropout_targets_in_the_prefix_or_packed_rows():
    objective, batch = CausalLM(), _batch(SUFFIXES)
    dropping = tiny_llama().train()
    dropping.model.layers[0].self_attn.attention_dropout = 0.1
    early_target = _batch(SUFFIXES)
    early_target["labels"][:, 3] = early_target["input_ids"][:, 3]  # a target inside the shared tokens
    packed = {k: v for k, v in batch.items() if k != "attention_mask"}
    packed["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with mock.patch.object(causal_lm, "prefix_cache", wraps=causal_lm.prefix_cache) as spy:
        objective(dropping, batch)
        objective(tiny_llama().train(), early_target)
        objective(tiny_llama().train(), packed)
    assert spy.call_count == 0


def test_common_prefix_counts_real_identical_columns_only():
    batch = _batch(SUFFIXES)
    assert common_prefix_length(batch["input_ids"], batch["attention_mask"]) == len(PREFIX)
    assert common_prefix_length(batch["input_ids"][:1], batch["attention_mask"][:1]) == 0  # one row: nothing to share
    same = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert common_prefix_length(same) == 2  # every row keeps a column of its own
    assert shared_prompt_length([[1, 2, 3, 4], [1, 2, 9], [1, 2, 3]]) == 2
    assert shared_prompt_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prompt_length([[1, 2, 3]]) == 0


def test_sequence_nll_with_a_shared_prefix_equals_each_sequence_alone():
    model = tiny_llama()
    batch = _batch(SUFFIXES, answer_len=3)
    ids = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    targets = [(lab[m.bool()] != IGNORE).tolist() for lab, m in zip(batch["labels"], batch["attention_mask"])]
    with mock.patch.object(scoring, "prefix_cache", wraps=scoring.prefix_cache) as spy:
        together = scoring.sequence_nll(model, ids, targets, batch_size=8)
    assert spy.call_count == 1
    for i in range(len(ids)):
        alone = scoring.sequence_nll(model, [ids[i]], [targets[i]], batch_size=1)[0]
        assert together[i][1] == alone[1] == 3
        assert together[i][0] == pytest.approx(alone[0], rel=1e-5)


def test_generation_with_a_shared_prefix_equals_each_prompt_alone():
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    prompts = [PREFIX + s for s in SUFFIXES]
    with mock.patch.object(generation, "prefix_cache", wraps=generation.prefix_cache) as spy:
        together = generate(model, tok, prompts, max_new_tokens=6)
    assert spy.call_count == 1
    for prompt, result in zip(prompts, together):
        alone = generate(model, tok, [prompt], max_new_tokens=6)[0]
        assert result.token_ids == alone.token_ids and result.text == alone.text


def test_generate_texts_batches_by_length_and_keeps_the_prompts_order():
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    prompts = [PREFIX + s for s in SUFFIXES] + [[3, 4, 5], PREFIX[:9] + [99]]
    batched = scoring.generate_texts(model, tok, prompts, max_new_tokens=4, batch_size=2)
    alone = [generate(model, tok, [p], max_new_tokens=4)[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def test_answer_nll_from_the_prompt_pass_equals_sequence_nll_and_leaves_generation_alone():
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    prompts = [PREFIX + s for s in SUFFIXES] + [[7, 8, 9]]  # a prompt without the shared prefix: batch has none
    answers = [([30, 31, 3], [True, True, True]), ([32, 3], [True, True]), ([33, 34, 35, 3], [True, True, True, False]),
               ([36], [True]), ([37, 3], [False, True])]
    plain = scoring.generate_texts(model, tok, prompts, max_new_tokens=5, batch_size=3)
    scored = scoring.generate_texts(model, tok, prompts, max_new_tokens=5, batch_size=3, answers=answers)
    assert [r.token_ids for r in scored] == [r.token_ids for r in plain]
    want = scoring.sequence_nll(model, [p + a for p, (a, _) in zip(prompts, answers)],
                                [[False] * len(p) + t for p, (_, t) in zip(prompts, answers)], batch_size=1)
    for result, (nll, count) in zip(scored, want):
        assert result.answer_nll[1] == count
        assert result.answer_nll[0] == pytest.approx(nll, rel=1e-5)
