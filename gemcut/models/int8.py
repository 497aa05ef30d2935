"""int8 weights for CPU serving: gemcut's on-disk format and its loader.

    gemcut export runs/my-run --merge --quantize int8 --out exported/my-run-int8
    model, tokenizer = load_int8("exported/my-run-int8")        # what `gemcut serve --model DIR` uses
    python -m pytest -q tests/test_export.py

Why a format of our own: torch's dynamic quantization (int8 weights, activations quantized per batch at
run time, fbgemm/onednn kernels) makes CPU inference faster and the weights 4x smaller, but a
dynamically quantized module holds packed parameters that neither `save_pretrained` nor safetensors can
store, and unpickling a torch.save file is unsafe. So the folder holds plain tensors:

- `model.int8.safetensors`: every non-Linear parameter in float32 (embeddings, norms), and for each Linear
  `<module>.qweight` (int8, [out, in]) and `<module>.wscale` (float32, [out]): symmetric per-output-channel
  quantization, `weight ~= qweight * wscale[:, None]`, plus `<module>.bias` when it has one;
- `config.json` (the transformers config, with a `quantization_config` naming this format), tokenizer
  files, `generation_config.json`;
- `quantize_config.json`: `{"format": "gemcut-int8", "version": 2, "modules": [...], "tied": {...}}`.

Which Linears stay float: the FFN output projections (`down_proj`, `fc2`, `c_proj`, `w2`, BERT's
`output.dense`) and the LM head. Their inputs carry outlier activations (Dettmers et al. 2022, LLM.int8(),
https://arxiv.org/abs/2208.07339) that per-tensor dynamic int8 activation quantization destroys: on
SmolLM2-135M, held-out perplexity goes 34.0 (float32) -> 115.8 with every Linear quantized, 37.1 with these
kept in float (int8 weights alone, without activation quantization, give 33.4). A tied LM head costs no
extra bytes, since it shares the embedding tensor, which is stored once.

`load_int8` builds the architecture from config.json, loads the float tensors, and swaps each listed
Linear for `torch.ao.nn.quantized.dynamic.Linear` holding exactly the saved int8 values and scales.

Plain transformers cannot load this folder, and it must not seem to: given a `model.safetensors` it does
not understand, `from_pretrained` fills every Linear with random weights and succeeds. So the weights file
has a name transformers does not look for (it raises "no file named model.safetensors") and config.json's
`quantization_config` names the format and its loader (transformers warns "Unknown quantization type,
got gemcut-int8 ..."). Version 1 folders (weights in `model.safetensors`) still load here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gemcut.errors import GemcutError

FORMAT = "gemcut-int8"
VERSION = 2
WEIGHTS = "model.int8.safetensors"  # not model.safetensors: see the module docstring
# What plain transformers reads from config.json, and names in its warning before it refuses the folder.
QUANTIZATION_CONFIG = {"quant_method": FORMAT,
                       "load_with": "gemcut.export.load_int8(folder) or `gemcut serve --model folder`; plain transformers cannot"}


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (qweight int8 [out, in], scale float32 [out])."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


KEEP_FLOAT = ("down_proj", "fc2", "c_proj", "w2", "output.dense", "lm_head", "score", "classifier")


def _linear_names(model: nn.Module, keep_float: tuple[str, ...] = KEEP_FLOAT) -> list[str]:
    return [name for name, mod in model.named_modules()
            if type(mod) is nn.Linear and not any(name == k or name.endswith("." + k) for k in keep_float)]


def save_int8(model: nn.Module, out_dir: str | Path) -> Path:
    """Write `model` (float, merged) in the gemcut-int8 format; returns the weights file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    linears = _linear_names(model)
    linear_set = set(linears)
    tensors: dict[str, torch.Tensor] = {}
    for name in linears:
        mod = model.get_submodule(name)
        q, s = quantize_weight(mod.weight)
        tensors[f"{name}.qweight"], tensors[f"{name}.wscale"] = q.contiguous(), s.contiguous()
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().float().contiguous()
    tied: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for pname, param in model.state_dict().items():
        owner = pname.rsplit(".", 1)[0]
        if owner in linear_set:
            continue
        # Tied weights (embedding = LM head) appear under several names: store once, record the tie.
        if param.data_ptr() in first_name:
            tied[pname] = first_name[param.data_ptr()]
            continue
        first_name[param.data_ptr()] = pname
        tensors[pname] = param.detach().float().contiguous()
    path = out / WEIGHTS
    save_file(tensors, path, metadata={"format": FORMAT})
    model.config.save_pretrained(out)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["quantization_config"] = QUANTIZATION_CONFIG
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    (out / "quantize_config.json").write_text(json.dumps(
        {"format": FORMAT, "version": VERSION, "scheme": "int8 symmetric per-output-channel weights; dynamic int8 activations",
         "modules": linears, "tied": tied, "model_class": type(model).__name__}, indent=2), encoding="utf-8")
    return path


def _quantized_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    with warnings.catch_warnings():
        # torch.ao eager quantization warns that it is moving to torchao; the kernels are what we want today.
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        mod = DynamicLinear(q.shape[1], q.shape[0], bias_=bias is not None, dtype=torch.qint8)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
        mod.set_weight_bias(qw, bias)
    return mod


def load_int8(path: str | Path):
    """Load a gemcut-int8 folder on the CPU; returns (model, tokenizer). The model is in eval mode."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    meta_file = path / "quantize_config.json"
    if not meta_file.is_file():
        raise GemcutError(f"{path}: no quantize_config.json; this is not a gemcut int8 export (run `gemcut export RUN --quantize int8`)")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("version") not in (1, VERSION):
        raise GemcutError(f"{meta_file}: format {meta.get('format')!r} v{meta.get('version')} is not {FORMAT} v1-v{VERSION}; re-export with this gemcut")
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # it only tells plain transformers to stay away
    cls = getattr(transformers, meta["model_class"], None)
    if cls is None:
        raise GemcutError(f"{meta_file}: model_class {meta['model_class']!r} is not in this transformers version")
    model = cls(config)
    tensors = load_file(path / (WEIGHTS if meta["version"] >= 2 else "model.safetensors"))
    quantized = set(meta["modules"])
    floats = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in quantized}
    tied = meta.get("tied", {})
    for dup, orig in tied.items():
        floats.setdefault(dup, floats[orig])
    missing, unexpected = model.load_state_dict(floats, strict=False)
    bad_missing = [k for k in missing if k.rsplit(".", 1)[0] not in quantized]
    if bad_missing or unexpected:
        raise GemcutError(f"{path}: the int8 weights do not match config.json: missing {bad_missing[:5]}, unexpected {unexpected[:5]}")
    for name in meta["modules"]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized_linear(tensors[f"{name}.qweight"], tensors[f"{name}.wscale"], tensors.get(f"{name}.bias")))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
