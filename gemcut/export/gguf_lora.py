"""Write a run's LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora adapter.gguf`, Ollama's ADAPTER).

    python -m pytest -q tests/test_export_gguf.py -k adapter

The layout is llama.cpp's convert_lora_to_gguf.py: `general.type` "adapter", `adapter.type` "lora",
`adapter.lora.alpha`, and for each adapted matrix two tensors named after the base tensor,
`blk.0.attn_q.weight.lora_a` (rank x in) and `.lora_b` (out x rank). llama.cpp scales B·A by alpha / rank
(rank read from each lora_a), so alpha is peft's `scaling * r`; where modules differ in scale (rank_pattern,
alpha_pattern) each B is multiplied by its own scale and alpha is written 0, which llama.cpp reads as
scale 1. Q and K adapters get the base's row permutation on B (their output rows), so B·A matches the
permuted base matrix. Adapters llama.cpp cannot apply as two low-rank matrices (DoRA, trained embeddings or
heads in modules_to_save) are refused with a pointer to the merged export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gemcut.errors import GemcutError
from gemcut.export.gguf_writer import check_llama, gguf_tensor_name, oriented_for_gguf


def lora_pairs(peft_model) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(transformers weight name, A (r x in), B (out x r), scaling) for each LoRA-adapted linear layer."""
    from peft.tuners.lora import LoraLayer

    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    if getattr(config, "use_dora", False):
        raise GemcutError("this run trained a DoRA adapter, which llama.cpp cannot apply as a LoRA GGUF; "
                          "export --format gguf with --merge (the default) instead")
    if getattr(config, "modules_to_save", None):
        raise GemcutError(f"the adapter also trains whole modules ({', '.join(config.modules_to_save)}), which a llama.cpp "
                          "LoRA GGUF cannot carry; export --format gguf with --merge (the default) instead")
    pairs = []
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        if adapter in getattr(module, "lora_embedding_A", {}):
            raise GemcutError(f"{module_name}: LoRA on an embedding cannot be written as a llama.cpp LoRA GGUF; use --merge")
        hf_name = module_name.split("base_model.model.", 1)[-1] + ".weight"
        a = module.lora_A[adapter].weight.detach().float().cpu().numpy()
        b = module.lora_B[adapter].weight.detach().float().cpu().numpy()
        pairs.append((hf_name, a, b, float(module.scaling[adapter])))
    if not pairs:
        raise GemcutError("the run's adapter has no LoRA matrices to export")
    return pairs


def write_lora_gguf(peft_model, path: str | Path, *, name: str = "gemcut-adapter") -> dict:
    """Write the active LoRA adapter of `peft_model` (a peft PeftModel on a Llama) to `path`.

    Returns {"path", "bytes", "tensors", "alpha", "rank"} (rank None when modules differ).
    """
    import gguf

    base = peft_model.get_base_model()
    config = base.config
    check_llama(config)
    pairs = lora_pairs(peft_model)
    ranks = {a.shape[0] for _, a, _, _ in pairs}
    scales = {s for *_, s in pairs}
    uniform = len(ranks) == 1 and len(scales) == 1
    alpha = next(iter(scales)) * next(iter(ranks)) if uniform else 0.0
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for hf_name, a, b, scale in pairs:
        base_name = gguf_tensor_name(hf_name, config.num_hidden_layers)
        if not uniform:
            b = b * scale  # llama.cpp applies scale 1 when alpha is 0: each module carries its own
        b = oriented_for_gguf(hf_name, b, config)
        # Adapters are small; float32 keeps them exact (llama.cpp converts on load).
        writer.add_tensor(f"{base_name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{base_name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": str(path), "bytes": path.stat().st_size, "tensors": 2 * len(pairs), "alpha": alpha,
            "rank": next(iter(ranks)) if len(ranks) == 1 else None}
