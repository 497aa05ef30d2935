"""Tiny random models and a tiny tokenizer, built in-process, for logic tests.

Every test that needs a model uses these instead of a download: a byte-level BPE tokenizer trained on a
few sentences (with a ChatML chat template like SmolLM2's), a 2-layer Llama, and a 2-layer BERT encoder.
Seeds are fixed, so the weights, and so pinned losses, are identical on every run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "hello world, this is a tiny corpus for a tiny tokenizer.",
    "the quick brown fox jumps over the lazy dog.",
    "what is the capital of france? paris is the capital of france.",
    "i love this product, it is great and wonderful!",
    "i hate waiting, this is terrible and awful.",
    "the weather is okay today, nothing special.",
    "user assistant system: answer the question briefly.",
    "0123456789 positive negative neutral",
]


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    fast.chat_template = CHATML
    return fast


def tiny_llama(tokenizer=None, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert_classifier(tokenizer=None, num_labels: int = 3, seed: int = 0) -> BertForSequenceClassification:
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertForSequenceClassification(cfg).eval()


def save_tiny_llama(path: str | Path, seed: int = 0) -> Path:
    """A local model folder (safetensors + tokenizer) that gemcut resolves like any user's folder."""
    path = Path(path)
    tok = tiny_tokenizer()
    tiny_llama(tok, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_bert(path: str | Path, num_labels: int = 3, seed: int = 0) -> Path:
    path = Path(path)
    tok = tiny_tokenizer()
    tiny_bert_classifier(tok, num_labels=num_labels, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def padded_classifier_batch(vocab_size: int = 99) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [4, 11], attention_mask, labels [4]) for a 3-class encoder; rows 1 and 3 end in padding
    (id 1), so code that rebuilds attention must carry the padding mask to get the same answer."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    ids[mask == 0] = 1
    return ids, mask, torch.tensor([0, 2, 1, 2])


# A tiny encoder classifier config, dropout off, for tests that compare a patched model with the original.
SMALL_ENCODER = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def encoder_classifier(name: str, attn: str = "sdpa"):
    """A SMALL_ENCODER classifier of one of the first-token heads: "bert", "roberta" or "electra"."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        ElectraConfig,
        ElectraForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    if name == "bert":
        return BertForSequenceClassification(BertConfig(**SMALL_ENCODER, attn_implementation=attn))
    if name == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(**SMALL_ENCODER, pad_token_id=1, attn_implementation=attn))
    if name == "electra":
        return ElectraForSequenceClassification(ElectraConfig(**SMALL_ENCODER, embedding_size=32, attn_implementation=attn))
    raise ValueError(name)


ENCODER_CLASSIFIERS = ("bert", "electra", "roberta")


def classifiers_read_elsewhere() -> list:
    """Classifiers the first-token code must leave alone: a decoder (reads each row's last real token) and a
    BERT whose attention SDPA cannot stand in for."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    decoder = LlamaForSequenceClassification(LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=4, intermediate_size=64, num_labels=3))
    flex = encoder_classifier("bert")
    flex.config._attn_implementation = "flex_attention"
    return [decoder, flex]


def logits_and_grads(model, ids, mask, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of one batch and the gradients of its mean cross-entropy, by parameter name."""
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    torch.nn.functional.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
