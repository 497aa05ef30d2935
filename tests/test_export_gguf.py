"""GGUF export parity: llama.cpp (through llama-cpp-python) answers like the merged model; the adapter GGUF applies.

    python -m pytest -q tests/test_export_gguf.py

llama.cpp is the proof: `pip install llama-cpp-python` (scripts/setup.sh, GEMCUT_LLAMA_CPP=1; it compiles
llama.cpp: 36 minutes on 2 busy cores). Where it is not installed, the llama.cpp tests skip and say so, and
the same greedy comparison runs through transformers' GGUF loader (which dequantizes the file and runs it in
transformers: it proves the file's tensors and names, not llama.cpp's reading of them).
The model is a tiny Llama trained for a few seconds on tests/tiny.py's corpus, so greedy answers are varied
and their top-1 margins are wide (a random tiny model repeats one token, which would prove nothing), with a
LoRA adapter that changes its answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import CORPUS, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from gemcut.errors import GemcutError
from gemcut.export.gguf_export import export_gguf
from gemcut.export.vllm import export_vllm
from gemcut.models.load import load_run

PROMPTS = ["hello world", "the quick brown", "what is the capital", "i love this", "the weather"]
NEW_TOKENS = 12
try:
    import llama_cpp
except ImportError:  # the build is optional: see the module docstring
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (GEMCUT_LLAMA_CPP=1 "
                                     "scripts/setup.sh builds it); the transformers GGUF loader test covers the file")


def trained_base(path: Path) -> Path:
    """A tiny Llama fitted to the corpus (loss ~0.05): its greedy continuations are corpus text."""
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    batch = tok(CORPUS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(80):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def gentle_lora_run(run_dir: Path, base_dir: Path) -> Path:
    """A LoRA run whose adapter changes answers without flattening the logits (small random B)."""
    from peft import LoraConfig, get_peft_model

    from gemcut.config import RunConfig
    from gemcut.data.templates import ChatTemplate
    from gemcut.models.load import save_final
    from gemcut.run_folder import run_meta

    tok = tiny_tokenizer()
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.6)
    config = RunConfig.model_validate({"model": {"name": str(base_dir)}, "adapter": {"method": "lora", "r": 4, "alpha": 8}})
    save_final(model, tok, ChatTemplate.from_tokenizer(tok), run_dir / "final", meta=run_meta(config, "causal_lm", base_path=str(base_dir)))
    return run_dir


def greedy(model, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    """Argmax continuation, EOS ignored (so every prompt gives n tokens to compare)."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


def llama_cpp_greedy(gguf: Path, prompts: list[list[int]], lora: Path | None = None) -> list[list[int]]:
    llm = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=128, n_threads=1,
                          n_batch=64, verbose=False)
    answers = []
    for ids in prompts:
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == NEW_TOKENS:
                break
        answers.append(out)
    llm.close()  # free the model now, not in a finalizer at interpreter exit
    return answers


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("gguf")
    run_dir = gentle_lora_run(tmp / "run", trained_base(tmp / "base"))
    loaded = load_run(run_dir)
    tok = loaded.tokenizer
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    base = AutoModelForCausalLM.from_pretrained(tmp / "base").eval()
    merged = loaded.model.merge_and_unload().eval()
    half = AutoModelForCausalLM.from_pretrained(tmp / "base").eval()
    half.load_state_dict({k: v.half().float() for k, v in merged.state_dict().items()})  # the f16 file's weights
    answers = {"merged": [greedy(merged, p) for p in prompts], "base": [greedy(base, p) for p in prompts],
               "merged_f16_weights": [greedy(half, p) for p in prompts]}
    assert answers["merged"] != answers["base"]  # the adapter really changes the answers
    assert all(len(set(a)) >= 4 for a in answers["merged"])  # varied, not one token repeated
    f16 = export_gguf(run_dir, tmp / "f16", quantize="f16")
    return {"tmp": tmp, "run": run_dir, "prompts": prompts, "answers": answers, "f16": f16, "tokenizer": tok}


def test_f16_gguf_metadata_matches_the_run(run):
    from gguf import GGUFReader

    reader = GGUFReader(str(run["f16"] / "model.gguf"))
    field = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tok = run["tokenizer"]
    assert field["general.architecture"] == "llama" and field["general.file_type"] == 1  # MOSTLY_F16
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert field["tokenizer.ggml.tokens"] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert field["tokenizer.chat_template"] == (run["run"] / "final" / "chat_template.jinja").read_text()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert field["tokenizer.ggml.eos_token_id"] == im_end and field["tokenizer.ggml.eot_token_id"] == im_end
    assert field["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert field["llama.context_length"] == 256 and field["llama.attention.head_count_kv"] == 2
    info = json.loads((run["f16"] / "export.json").read_text())
    assert info["files"]["model.gguf"]["tensor_types"] == {"F16": 15, "F32": 5}


def test_f16_gguf_in_transformers_gguf_loader_gives_the_same_greedy_answers(run):
    model = AutoModelForCausalLM.from_pretrained(run["f16"], gguf_file="model.gguf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(run["f16"], gguf_file="model.gguf")
    assert [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS] == run["prompts"]
    assert [greedy(model, p) for p in run["prompts"]] == run["answers"]["merged_f16_weights"] == run["answers"]["merged"]


@needs_llama_cpp
def test_f16_gguf_in_llama_cpp_gives_the_merged_models_greedy_answers(run):
    gguf = run["f16"] / "model.gguf"
    assert llama_cpp_greedy(gguf, run["prompts"]) == run["answers"]["merged"]
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, verbose=False)
    for text, ids in zip(PROMPTS, run["prompts"]):  # llama.cpp's tokenizer splits text as the run's does
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    chat = "<|im_start|>user\nhello world<|im_end|>\n"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == run["tokenizer"](chat, add_special_tokens=False)["input_ids"]
    assert llm.metadata["tokenizer.chat_template"] == (run["run"] / "final" / "chat_template.jinja").read_text()


@needs_llama_cpp
def test_q8_0_and_q4_0_in_llama_cpp_agree_with_the_merged_model(run):
    reference = run["answers"]["merged"]
    rates = {}
    for quantize in ("q8_0", "q4_0"):
        out = export_gguf(run["run"], run["tmp"] / quantize, quantize=quantize)
        answers = llama_cpp_greedy(out / "model.gguf", run["prompts"])
        same = sum(a == b for got, want in zip(answers, reference) for a, b in zip(got, want))
        rates[quantize] = same / (len(reference) * NEW_TOKENS)
    print(f"greedy token agreement with the float model: {rates}")
    assert rates["q8_0"] >= 0.9 and rates["q4_0"] >= 0.5


def test_adapter_gguf_is_the_merged_difference(run):
    """base.gguf + alpha/r * B·A (llama.cpp's rule) equals the merged model's tensor, for every adapted matrix."""
    from gguf import GGUFReader

    out = export_gguf(run["run"], run["tmp"] / "adapter-f16", quantize="f16", merge=False)
    assert (out / "Modelfile").read_text().startswith("FROM ./base.gguf\nADAPTER ./adapter.gguf\n")
    adapter = GGUFReader(str(out / "adapter.gguf"))
    fields = {name: f.contents() for name, f in adapter.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in adapter.tensors}
    base = {t.name: np.array(t.data, dtype=np.float32) for t in GGUFReader(str(out / "base.gguf")).tensors}
    merged = {t.name: np.array(t.data, dtype=np.float32) for t in GGUFReader(str(run["f16"] / "model.gguf")).tensors}
    adapted = sorted(name.removesuffix(".lora_a") for name in tensors if name.endswith(".lora_a"))
    assert len(adapted) == 2 * 4 and "blk.0.attn_k.weight" in adapted
    for name in adapted:
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        assert a.shape[0] == b.shape[1] == 4
        np.testing.assert_allclose(base[name] + 8.0 / 4 * b @ a, merged[name], atol=2e-3, rtol=0)


@needs_llama_cpp
def test_adapter_gguf_applies_in_llama_cpp(run):
    out = run["tmp"] / "adapter-f16"
    if not out.exists():
        export_gguf(run["run"], out, quantize="f16", merge=False)
    assert llama_cpp_greedy(out / "base.gguf", run["prompts"]) == run["answers"]["base"]
    assert llama_cpp_greedy(out / "base.gguf", run["prompts"], lora=out / "adapter.gguf") == run["answers"]["merged"]


def test_gguf_refusals_and_command(run, tmp_path):
    from typer.testing import CliRunner

    from gemcut.cli import app, register_commands

    with pytest.raises(GemcutError, match="q5_k"):
        export_gguf(run["run"], tmp_path / "x", quantize="q5_k")
    with pytest.raises(GemcutError, match="not empty"):
        export_gguf(run["run"], run["f16"])
    register_commands()
    result = CliRunner().invoke(app, ["export", str(run["run"]), "--format", "gguf", "--quantize", "q4_0", "--out", str(tmp_path / "q4")])
    assert result.exit_code == 0, result.output
    assert "model.gguf" in result.output and "ollama create" in result.output
    info = json.loads((tmp_path / "q4" / "export.json").read_text())
    assert info["files"]["model.gguf"]["tensor_types"] == {"Q4_0": 14, "Q8_0": 1, "F32": 5}
    assert CliRunner().invoke(app, ["export", str(run["run"]), "--format", "onnx"]).exit_code != 0
    assert CliRunner().invoke(app, ["export", str(run["run"]), "--format", "vllm", "--quantize", "q8_0"]).exit_code != 0
    assert CliRunner().invoke(app, ["export", str(run["run"]), "--format", "gguf", "--dtype", "bf16"]).exit_code != 0
    vllm = CliRunner().invoke(app, ["export", str(run["run"]), "--format", "vllm", "--out", str(tmp_path / "v")])
    assert vllm.exit_code == 0 and "README.md" in vllm.output, vllm.output


def test_vllm_folder_loads_in_transformers_with_template_and_stops(run, tmp_path):
    out = export_vllm(run["run"], tmp_path / "vllm")
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # what vLLM's loader reads: config + safetensors
    assert next(model.parameters()).dtype == torch.bfloat16
    assert [greedy(model.float(), p, 4) for p in run["prompts"]][:2] == [a[:4] for a in run["answers"]["merged"][:2]]
    source = (run["run"] / "final" / "chat_template.jinja").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == source
    assert (out / "chat_template.jinja").read_text() == source
    assert AutoTokenizer.from_pretrained(out).chat_template == source  # what vLLM's tokenizer loading reads
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert run["tokenizer"].convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    assert f"vllm serve {out.resolve()}" in (out / "README.md").read_text()
    adapter = export_vllm(run["run"], tmp_path / "vllm-adapter", merge=False)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and (adapter / "adapter_model.safetensors").is_file()
    readme = (adapter / "README.md").read_text()
    assert "--enable-lora" in readme and f"--lora-modules run={adapter.resolve()}" in readme and "--max-lora-rank 8" in readme


@needs_llama_cpp
def test_llama3_rope_scaling_gives_the_models_logits_in_llama_cpp(tmp_path):
    """Llama 3.1/3.2 scale rope frequencies; the GGUF carries them as rope_freqs.weight (a tiny model whose original
    context of 16 puts most frequencies in the scaled range)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    logits = {}
    for kind, scaling in (("llama3", rope), ("default", None)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                             rope_scaling=scaling, tie_word_embeddings=True, initializer_range=0.1)).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.half().float())  # the f16 file's weights
            logits[kind] = model(torch.tensor([list(range(5, 105))])).logits[0].numpy()
        if kind == "llama3":
            from gemcut.export.gguf_writer import write_model_gguf

            info = write_model_gguf(model, tok, tmp_path / "rope.gguf", quantize="f16")
            assert info["tensor_types"]["F32"] == 6  # 5 norms + rope_freqs
    llm = llama_cpp.Llama(model_path=str(tmp_path / "rope.gguf"), logits_all=True, n_ctx=128, verbose=False)
    llm.eval(list(range(5, 105)))
    got = np.array(llm.scores[:100])
    assert np.abs(got - logits["llama3"]).max() < 0.02 < np.abs(got - logits["default"]).max() / 10
