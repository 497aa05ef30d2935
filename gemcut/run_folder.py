"""The run folder on disk: `gemcut_run.json` and the checkpoint files, as training writes them and loading reads them.

    python -m pytest -q tests/test_run_folder.py tests/test_checkpoint.py tests/test_models_load.py

    runs/<name>/
      gemcut_run.json          what `load_run` needs to rebuild the run (`run_meta`): base model, task, adapter, labels, config
      checkpoints/step-N/      model.safetensors (the trainable weights, by name), state.json, config.yaml, ... COMPLETE last
      checkpoints/best         a text file naming the best `step-N`
      final/                   the finished model (gemcut/models/load.py `save_final`), with its own gemcut_run.json

This is the one format both sides share, so it sits below both: gemcut/train/checkpoint.py writes checkpoints
(adding the optimizer, scheduler and RNG files, the atomic rename and resume) and gemcut/models/load.py reads
them, and the loader never imports the trainer. It is a file format, like the data formats of gemcut/data/,
and knows nothing of models beyond a module's named parameters.

Every read of a checkpoint file goes through `read_checkpoint_file`, so a missing, truncated or garbled file,
a weight that is nan or inf, or weights whose names or shapes do not fit the model raise a `CheckpointError`
naming the checkpoint and the problem.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from gemcut.errors import GemcutError, TrainingError

RUN_META = "gemcut_run.json"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
WEIGHTS = "model.safetensors"
BEST = "best"


class CheckpointError(TrainingError):
    """A checkpoint that cannot be used: a file missing or unreadable, a weight that is not finite, or weights
    that do not fit the model."""


# ---------------------------------------------------------------- gemcut_run.json


def run_meta(config, task: str, labels: list[str] | None = None, base_path: str | None = None) -> dict:
    """The `gemcut_run.json` contents for a RunConfig (or its dict): what `load_run` needs to rebuild the run."""
    cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    return {"base_model": cfg["model"]["name"], "base_path": base_path, "task": task,
            "adapter": cfg["adapter"]["method"], "labels": labels, "config": cfg}


def write_run_meta(directory: str | Path, meta: dict) -> Path:
    """Write `gemcut_run.json` atomically (the loop puts one at the run root so checkpoints can be loaded)."""
    path = Path(directory) / RUN_META
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, path)
    return path


def read_run_meta(directory: str | Path) -> dict | None:
    """The `gemcut_run.json` in `directory`, or None when there is none."""
    path = Path(directory) / RUN_META
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---------------------------------------------------------------- finding checkpoints


def checkpoint_step(path: Path) -> int:
    """N of a `step-N` checkpoint folder."""
    return int(Path(path).name.split("-", 1)[1])


def complete_checkpoints(root: Path) -> list[Path]:
    """`step-N` folders with a COMPLETE marker, oldest first (`.tmp-*` and unmarked folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit() and (p / COMPLETE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def best_checkpoint(root: Path) -> Path | None:
    marker = Path(root) / BEST
    if not marker.is_file():
        return None
    path = Path(root) / marker.read_text().strip()
    return path if (path / COMPLETE).is_file() else None


def find_checkpoint(run_dir: Path, checkpoint: str) -> Path:
    """The checkpoint folder of `run_dir` that `checkpoint` ("best", "last" or "step-N") names, or a
    GemcutError listing the complete checkpoints there."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    available = ", ".join(p.name for p in complete_checkpoints(root)) or "none"
    if checkpoint == "best":
        path = best_checkpoint(root)
        if path is None:
            raise GemcutError(f"{run_dir}: no best checkpoint marked (checkpoints/best); complete checkpoints: {available}")
        return path
    if checkpoint == "last":
        path = latest_checkpoint(root)
        if path is None:
            raise GemcutError(f"{run_dir}: no complete checkpoint under checkpoints/")
        return path
    if checkpoint.startswith("step-") and checkpoint[5:].isdigit():
        path = root / checkpoint
        if not (path / COMPLETE).is_file():
            raise GemcutError(f"{path}: not a complete checkpoint (no {COMPLETE} marker); complete checkpoints: {available}")
        return path
    raise GemcutError(f"checkpoint {checkpoint!r} is not one of final, best, last, step-N")


# ---------------------------------------------------------------- reading checkpoint files


def _unusable(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} cannot be used: {problem}")


def read_checkpoint_file(path: Path, name: str, read: Callable[[Path], Any]) -> Any:
    """`read(path / name)`, with every way a damaged file fails turned into a CheckpointError naming it."""
    file = Path(path) / name
    if not file.is_file():
        raise _unusable(path, f"{name} is missing")
    try:
        return read(file)
    except Exception as e:  # safetensors, torch's zip reader, json and yaml each raise their own types
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise _unusable(path, f"{name} cannot be read ({type(e).__name__}: {detail})") from None


def _mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping, found {type(value).__name__}")
    return value


def read_state(path: Path) -> dict:
    """The training position a checkpoint was saved at (`state.json`), as a dict."""
    return read_checkpoint_file(path, "state.json", lambda f: _mapping(json.loads(f.read_text())))


def read_config(path: Path) -> dict:
    """The run config a checkpoint was made with, as a dict."""
    return read_checkpoint_file(path, "config.yaml", lambda f: _mapping(yaml.safe_load(f.read_text())))


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (`requires_grad`), by name: what a checkpoint's weights file holds."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _mismatch(saved: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> str | None:
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        return f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    # Names alone are not enough: copy_ would broadcast a [1, d] tensor into a [k, d] parameter.
    differ = [n for n, p in params.items() if saved[n].shape != p.shape]
    if not differ:
        return None
    n = differ[0]
    more = f", and {len(differ) - 1} more" if len(differ) > 1 else ""
    return f"{n} is {list(saved[n].shape)} there, {list(params[n].shape)} in the model{more}"


def read_weights(path: Path, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The saved trainable weights of checkpoint `path`, shown readable and finite and, given `params` (the
    model's trainable parameters by name), of the same names and shapes."""
    saved = read_checkpoint_file(path, WEIGHTS, lambda f: load_file(str(f)))
    bad = {n: int((~torch.isfinite(t)).sum()) for n, t in saved.items() if t.is_floating_point()}
    bad = {n: k for n, k in bad.items() if k}
    if bad:
        total = sum(t.numel() for t in saved.values())
        raise _unusable(path, f"{WEIGHTS} holds {sum(bad.values()):,} of {total:,} weights that are nan or inf (in {', '.join(list(bad)[:3])})")
    problem = _mismatch(saved, params) if params is not None else None
    if problem:
        raise _unusable(path, f"{WEIGHTS} does not match the model's trainable parameters ({problem}); "
                              "was it made with another model or adapter config?")
    return saved


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    """Copy saved trainable weights into `model`; names and shapes must match exactly (see `read_weights`)."""
    params = trainable_parameters(model)
    saved = read_weights(path, params)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
