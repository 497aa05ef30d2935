"""Write a Llama-architecture transformers model as a GGUF file (llama.cpp, Ollama), in pure Python.

    python -m pytest -q tests/test_export_gguf.py

No compiler and no llama.cpp checkout: the `gguf` package (llama.cpp's own Python writer) writes the file and
quantizes Q8_0/Q4_0 blocks. What goes in follows llama.cpp's convert_hf_to_gguf.py for `LlamaForCausalLM`:
- hyperparameters under `llama.*` (context, widths, heads, rope base, norm epsilon, head size);
- tensors renamed with gguf's own name map (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`),
  with Q and K rows permuted (`permute_qk`): transformers' rotary embedding rotates the two halves of each
  head, llama.cpp rotates interleaved pairs, so the rows are reordered to give the same attention;
- the tokenizer as llama.cpp's "gpt2" byte-level BPE: tokens, token types, merges, bos/eos/pad/unk ids, and
  the pre-tokenizer named after the run's tokenizer.json (`pre_tokenizer_name`) so both split text the same;
- the run's chat template (`tokenizer.chat_template`) and its end-of-turn token (`tokenizer.ggml.eot_token_id`),
  so llama.cpp and Ollama stop where the run learned to stop.
Norms and biases stay float32; `quantize` chooses the type of the matrices (f16, bf16, q8_0, q4_0; in q4_0
the embedding stays q8_0, as llama-quantize keeps the output matrix at higher precision). A matrix whose rows
are not a whole number of 32-value blocks is written f16, as convert_hf_to_gguf does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gemcut.errors import GemcutError

QUANTIZE_TYPES = ("f16", "bf16", "q8_0", "q4_0")
# Rope variants gemcut writes: llama.cpp reads linear from metadata, llama3 (Llama 3.1/3.2) from a rope_freqs tensor.
SUPPORTED_ROPE = ("default", "linear", "llama3")


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Reorder Q or K projection rows (or a bias) from transformers' rotate-half layout to llama.cpp's
    interleaved one; exactly convert_hf_to_gguf.py's `LlamaModel.permute`. K passes its own head count."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def gguf_tensor_name(hf_name: str, n_blocks: int) -> str:
    """The GGUF name of a transformers Llama parameter, from gguf's own name map."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise GemcutError(f"{hf_name}: no GGUF name for this Llama parameter; the GGUF export handles the tensors of "
                          "transformers' LlamaForCausalLM only")
    return new


def oriented_for_gguf(hf_name: str, data: np.ndarray, config) -> np.ndarray:
    """`data` with Q/K rows permuted when `hf_name` is a q_proj or k_proj parameter; others unchanged."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_qk(data, config.num_attention_heads, config.num_attention_heads)
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_qk(data, config.num_attention_heads, config.num_key_value_heads)
    return data


def check_llama(config) -> None:
    """Refuse models llama.cpp's llama graph would run differently, naming what differs."""
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "model_type", None) != "llama":
        raise GemcutError(f"GGUF export supports Llama-architecture models (model_type llama: SmolLM2, Llama 2/3.x, TinyLlama); "
                          f"this one is {getattr(config, 'model_type', None)!r} ({', '.join(archs) or 'no architectures'}); "
                          "export --format transformers or --format vllm instead")
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE:
        raise GemcutError(f"config.json rope_scaling type {rope_type!r} is not supported by gemcut's GGUF export "
                          f"(supported: {', '.join(SUPPORTED_ROPE)}); use llama.cpp's convert_hf_to_gguf.py on --format transformers output")


def llama3_rope_factors(config) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling, as convert_hf_to_gguf.py writes them (`rope_freqs.weight`)."""
    import math

    rope = rope_parameters(config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs in rope_theta/rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    for key, value in scaling.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    return params


# ----------------------------------------------------------------------------------------- tokenizer


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the way this tokenizer.json splits text before BPE.

    llama.cpp's converter recognises pre-tokenizers by hashing the ids of a test text; gemcut reads the
    structure instead, for the byte-level BPE families Llama-architecture models use.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM/SmolLM2 as published: each digit on its own, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and "\\p{N}{1,3}" in json.dumps(steps[0].get("pattern", {})):
        return "llama-bpe"  # Llama 3's split: numbers in groups of up to three
    raise GemcutError(f"tokenizer.json pre_tokenizer {json.dumps(pre)[:200]} is not one gemcut maps to llama.cpp "
                      "(known: GPT-2 byte level, SmolLM, Llama 3); export --format transformers and convert with "
                      "llama.cpp's convert_hf_to_gguf.py")


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """Everything llama.cpp's gpt2 BPE vocabulary needs: tokens, types, merges, special ids, bos/eos flags."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GemcutError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: GGUF export needs a fast "
                          "(tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    if spec.get("model", {}).get("type") != "BPE" or spec["model"].get("byte_fallback"):
        raise GemcutError("GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 use); "
                          f"this tokenizer.json has model type {spec.get('model', {}).get('type')!r}")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {int(i): a for i, a in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding is wider than the vocabulary: llama.cpp wants a name for every row
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(spec),
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
            "pad": tokenizer.pad_token_id,
            "add_bos": len(full) > len(plain) and full[0] == tokenizer.bos_token_id,
            "add_eos": len(full) > len(plain) and full[-1] == tokenizer.eos_token_id}


def add_tokenizer(writer, fields: dict, chat_template: str | None, end_of_turn_id: int | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if fields[key] is not None:
            add(int(fields[key]))
    writer.add_add_bos_token(bool(fields["add_bos"]))
    writer.add_add_eos_token(bool(fields["add_eos"]))
    # The token the template ends an assistant turn with (<|im_end|> for ChatML), which may differ from EOS.
    if end_of_turn_id is not None:
        writer.add_eot_token_id(int(end_of_turn_id))
    if chat_template:
        writer.add_chat_template(chat_template)


# ----------------------------------------------------------------------------------------- tensors


def tensor_for_gguf(gguf_name: str, data: np.ndarray, quantize: str):
    """(array, raw_dtype or None) as the writer takes it: 1-D tensors float32, matrices in `quantize`."""
    import gguf
    from gguf.quants import QuantError
    from gguf.quants import quantize as quantize_blocks

    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim == 1:
        return data, None
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[quantize]
    if quantize == "q4_0" and gguf_name in ("token_embd.weight", "output.weight"):
        qtype = gguf.GGMLQuantizationType.Q8_0
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    try:
        return quantize_blocks(data, qtype), qtype
    except QuantError:  # rows not a multiple of the block size
        return data.astype(np.float16), None


def file_type(quantize: str) -> int:
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quantize]


def add_llama_hparams(writer, config, quantize: str | None) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads or config.num_attention_heads))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    if quantize is not None:
        writer.add_file_type(file_type(quantize))


def write_model_gguf(model, tokenizer, path: str | Path, *, quantize: str = "f16", chat_template: str | None = None,
                     end_of_turn_id: int | None = None, name: str = "gemcut-export") -> dict:
    """Write a (merged, float) transformers LlamaForCausalLM to `path` as GGUF; returns a summary.

    Args:
        model: the merged model; its weights are read on the CPU as float32 and converted per `quantize`.
        tokenizer: the run's fast tokenizer (byte-level BPE).
        quantize: matrix type: f16, bf16, q8_0 or q4_0.
        chat_template: Jinja source stored as `tokenizer.chat_template` (the run's template).
        end_of_turn_id: the token that ends an assistant turn in the chat template (`tokenizer.ggml.eot_token_id`).
        name: `general.name`.
    Returns: {"path", "bytes", "tensor_types": {type: count}, "pre_tokenizer"}.
    """
    import gguf

    if quantize not in QUANTIZE_TYPES:
        raise GemcutError(f"--quantize {quantize!r} is not a GGUF type gemcut writes; use one of {', '.join(QUANTIZE_TYPES)}")
    config = model.config
    check_llama(config)
    path = Path(path)
    fields = tokenizer_fields(tokenizer, int(config.vocab_size))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_llama_hparams(writer, config, quantize)
    add_tokenizer(writer, fields, chat_template, end_of_turn_id)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts: dict[str, int] = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the same matrix as token_embd
        new = gguf_tensor_name(hf_name, config.num_hidden_layers)
        data = oriented_for_gguf(hf_name, tensor.detach().float().cpu().numpy(), config)
        array, raw_dtype = tensor_for_gguf(new, data, quantize)
        writer.add_tensor(new, array, raw_dtype=raw_dtype)
        kind = raw_dtype.name if raw_dtype is not None else {np.float32: "F32", np.float16: "F16"}[array.dtype.type]
        counts[kind] = counts.get(kind, 0) + 1
    if rope_parameters(config).get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
        counts["F32"] = counts.get("F32", 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": str(path), "bytes": path.stat().st_size, "tensor_types": counts, "pre_tokenizer": fields["pre"]}
