"""Export runs for other tools and for CPU serving: merged safetensors, peft adapters, gemcut-int8.

    gemcut export runs/my-run --merge --out exported/my-run
"""

from gemcut.export.merge import export_run
from gemcut.models.int8 import load_int8, save_int8

__all__ = ["export_run", "load_int8", "save_int8"]
