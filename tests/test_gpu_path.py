"""The GPU path on a machine without one: QLoRA and flash attention are refused with the fix, attention
auto-resolves to sdpa, a QLoRA run's adapter loads on the plain base, and bench/gpu.py exits with one line.

    python -m pytest -q tests/test_gpu_path.py
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from tiny import save_tiny_llama

import gemcut.models.load as load
from gemcut.config import AdapterConfig, RunConfig
from gemcut.data.templates import ChatTemplate
from gemcut.errors import ConfigError
from gemcut.models.adapters import apply_adapter, trainable_summary
from gemcut.models.load import load_base, load_run, resolve_attn_implementation, save_final
from gemcut.run_folder import COMPLETE, run_meta
from gemcut.tasks import task_named

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMCUT_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("m") / "tiny-llama")


def _cfg(name, method="lora", **model):
    return RunConfig.model_validate({"model": {"name": str(name), **model}, "adapter": {"method": method, "r": 4}})


def test_qlora_config_asks_for_a_4bit_nf4_base():
    assert AdapterConfig(method="qlora").base_quantization() == {"bits": 4, "quant_type": "nf4", "double_quant": True}
    assert AdapterConfig(method="qlora", quant_type="fp4", double_quant=False).base_quantization()["quant_type"] == "fp4"
    assert AdapterConfig(method="lora").base_quantization() is None


@NO_GPU
def test_qlora_refused_here_with_the_fix(llama_dir):
    cfg = _cfg(llama_dir, "qlora")
    with pytest.raises(ConfigError) as err:
        load_base(cfg.model, "causal_lm", quantization=cfg.adapter.base_quantization())
    msg = str(err.value)
    assert "adapter.method=qlora cannot run here" in msg and "no CUDA GPU" in msg
    assert "install bitsandbytes on a CUDA machine" in msg and "adapter.method=lora" in msg


def test_qlora_adapter_needs_a_4bit_base(llama_dir):
    cfg = _cfg(llama_dir, "qlora")
    model, _ = load_base(cfg.model, "causal_lm")  # no quantization: the caller forgot it
    with pytest.raises(ConfigError, match="loaded in 4 bits.*base_quantization"):
        apply_adapter(model, cfg.adapter, "causal_lm")


def test_attention_auto_is_sdpa_without_cuda_and_flash_attn(llama_dir):
    causal = task_named("causal_lm")
    if load.flash_attention_missing() is not None:
        assert resolve_attn_implementation("auto", torch.bfloat16, task=causal) == "sdpa"
    assert resolve_attn_implementation("auto", torch.float32, task=causal) == "sdpa"
    assert resolve_attn_implementation("eager", torch.float32, task=causal) == "eager"
    model, _ = load_base(_cfg(llama_dir).model, "causal_lm")  # the default is auto
    assert _cfg(llama_dir).model.attn_implementation == "auto"
    assert model.config._attn_implementation == "sdpa"
    bf16, _ = load_base(_cfg(llama_dir, dtype="bfloat16").model, "causal_lm")
    assert bf16.config._attn_implementation == ("sdpa" if load.flash_attention_missing() else "flash_attention_2")


def test_attention_auto_picks_flash_only_for_half_precision_decoders(monkeypatch):
    monkeypatch.setattr(load, "flash_attention_missing", lambda: None)  # as on a CUDA machine with flash_attn
    causal, classify = task_named("causal_lm"), task_named("classify")
    assert resolve_attn_implementation("auto", torch.bfloat16, task=causal) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.float16, task=causal) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.float32, task=causal, quantized=True) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.float32, task=causal) == "sdpa"
    assert resolve_attn_implementation("auto", torch.bfloat16, task=classify) == "sdpa"


@NO_GPU
def test_explicit_flash_attention_refused_here_with_the_fix(llama_dir):
    cfg = _cfg(llama_dir, attn_implementation="flash_attention_2", dtype="bfloat16")
    with pytest.raises(ConfigError) as err:
        load_base(cfg.model, "causal_lm")
    msg = str(err.value)
    assert "model.attn_implementation=flash_attention_2 cannot run here" in msg and "no CUDA GPU" in msg
    assert "pip install flash-attn" in msg and "model.attn_implementation=auto" in msg


def _logits(model, tok):
    ids = torch.tensor([tok("i love this product, it is great")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_qlora_run_loads_its_adapter_on_the_unquantized_base(llama_dir, tmp_path):
    """A QLoRA run's final/ and checkpoints hold LoRA weights with the names plain LoRA has; a run folder
    whose config says qlora loads both ways on the full-precision base (here a LoRA stands in for the
    4-bit-trained adapter, which needs a GPU to make)."""
    from gemcut.train.checkpoint import trainable_state_dict

    cfg = _cfg(llama_dir, "qlora")
    torch.manual_seed(0)
    model, tok = load_base(cfg.model, "causal_lm")
    model = apply_adapter(model, cfg.adapter.model_copy(update={"method": "lora"}), "causal_lm")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints" / "step-2"
    ck.mkdir(parents=True)
    save_file(trainable_state_dict(model), str(ck / "model.safetensors"))
    (ck / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (ck / COMPLETE).write_text("done")
    model.eval()
    expected = _logits(model, tok)
    template = ChatTemplate.from_tokenizer(tok, "alpaca")
    save_final(model, tok, template, run_dir / "final", meta=run_meta(cfg, "causal_lm"))
    final = load_run(run_dir)
    assert final.meta["adapter"] == "qlora" and final.meta["format"] == "adapter"
    torch.testing.assert_close(_logits(final.model, final.tokenizer), expected, rtol=0, atol=0)
    last = load_run(run_dir, "last")
    torch.testing.assert_close(_logits(last.model, last.tokenizer), expected, rtol=0, atol=0)


def test_qlora_summary_names_the_4bit_base():
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4))

    assert trainable_summary(Linear(), AdapterConfig(method="qlora", r=8)).startswith("QLoRA r=8 on a 4-bit nf4 base")


@NO_GPU
def test_gpu_bench_exits_with_one_line_without_cuda():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True, timeout=300)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and len(out.splitlines()) == 1
    assert "CUDA" in out and "bench/gpu.py" in out


def test_packed_rows_run_as_one_row_under_flash_attention_and_give_the_same_logits():
    """transformers' flash path separates packed documents only in a batch of one row, so the causal-LM
    objective hands it one row of all the packed rows' tokens; that row computes what the rows do alone
    (checked here with sdpa's block-diagonal mask, which holds for any batch)."""
    from types import SimpleNamespace

    import torch
    from tiny import tiny_llama, tiny_tokenizer

    from gemcut.objectives.causal_lm import packed_as_one_row

    model = tiny_llama(tiny_tokenizer()).eval()
    ids = torch.randint(5, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(12)), list(range(4)) * 3])
    inputs = {"input_ids": ids, "position_ids": positions}
    forward = lambda x: model(**x, use_cache=False).logits  # noqa: E731
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))  # what dispatch reads
    seen = []
    with torch.no_grad():
        rows = forward(inputs)
        one_row = packed_as_one_row(flash, inputs, lambda x: seen.append(tuple(x["input_ids"].shape)) or forward(x))
        assert packed_as_one_row(model, inputs, lambda x: seen.append(tuple(x["input_ids"].shape)) or forward(x)) is not None
    assert seen == [(1, 36), (3, 12)]  # flash: one row; sdpa: the rows as they are
    torch.testing.assert_close(one_row, rows, rtol=1e-5, atol=1e-5)
