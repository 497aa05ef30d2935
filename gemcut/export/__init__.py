"""Export runs for other tools and for CPU serving: merged safetensors, peft adapters, gemcut-int8, GGUF
(llama.cpp, Ollama) and vLLM-ready folders.

    gemcut export runs/my-run --merge --out exported/my-run
    gemcut export runs/my-run --format gguf --quantize q8_0
    gemcut export runs/my-run --format vllm
"""

from gemcut.export.gguf_export import export_gguf
from gemcut.export.merge import export_run
from gemcut.export.vllm import export_vllm
from gemcut.models.int8 import load_int8, save_int8

__all__ = ["export_gguf", "export_run", "export_vllm", "load_int8", "save_int8"]
