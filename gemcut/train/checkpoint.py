"""Atomic, resumable checkpoints: `runs/<name>/checkpoints/step-N/`.

    python -m pytest -q tests/test_checkpoint.py

A checkpoint is written into `checkpoints/.tmp-step-N/`, every file fsynced, a `COMPLETE` marker written
last, and only then renamed to `step-N` (a rename within one folder is atomic). A process killed at any
moment leaves either a `.tmp-*` folder, which resume ignores and the next save removes, or a complete
`step-N`. Contents:

| file                | what                                                                          |
|---------------------|-------------------------------------------------------------------------------|
| `model.safetensors` | the trainable parameters only (`requires_grad`), by their names in the model  |
| `optimizer.pt`      | optimizer state_dict                                                          |
| `scheduler.pt`      | learning-rate scheduler state_dict                                            |
| `rng.pt`            | Python, NumPy, torch CPU (and CUDA) generator states, as tensors and lists    |
| `state.json`        | step, epoch, index in the epoch's order, tokens seen, best metric, data hash  |
| `config.yaml`       | the resolved run config                                                       |
| `COMPLETE`          | written last                                                                  |

Every `.pt` file holds only tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`: a checkpoint never unpickles code. `checkpoints/best` is a text file
naming the best checkpoint (`step-N`); pruning to `keep_last_n` never removes it.

The files that loading a checkpoint needs (the weights, `state.json`, `config.yaml`, the COMPLETE and `best`
markers) are read through gemcut/run_folder.py, the format this module shares with gemcut/models/load.py;
this module is the training side: saving, pruning, and resume. A damaged file raises a `CheckpointError`
naming the checkpoint and the problem; resume then names the newest intact checkpoint and how to continue
from it (`resume_point`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from gemcut.errors import TrainingError
from gemcut.run_folder import (
    BEST,
    COMPLETE,
    WEIGHTS,
    CheckpointError,
    best_checkpoint,
    checkpoint_step,
    complete_checkpoints,
    latest_checkpoint,
    load_trainable,
    read_checkpoint_file,
    read_config,
    read_state,
    read_weights,
    trainable_parameters,
)

TMP_PREFIX = ".tmp-"
# Settings that may change between a run and its resume without changing what is computed.
RESUME_MAY_DIFFER = ("train.force", "train.num_threads", "train.log_every", "train.sample_prompts", "train.report_to",
                     "train.micro_batch_size", "train.distributed.",  # how the same steps are split over processes
                     "model.attn_implementation",  # the same attention, computed by another kernel
                     "eval.", "output.")


@dataclasses.dataclass
class TrainState:
    """Where training stands. `index` counts examples of epoch `epoch`'s order already consumed."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    data_hash: str = ""


# ---------------------------------------------------------------- weights and RNG


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name, as contiguous CPU tensors (what safetensors stores). A model sharded
    by FSDP2 is gathered whole: every process must call it; the whole tensors arrive on the main process (the
    others get an empty dict)."""
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        names = {n for n, p in model.named_parameters() if p.requires_grad}
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: t.contiguous() for n, t in full.items() if n in names}
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 shards the model's parameters (they are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper


def optimizer_state_dict(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state keyed by parameter name, whole (gathered from FSDP2's shards: every process must
    call it), so that a checkpoint resumes on any number of processes and under any strategy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _raw(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather(model: torch.nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights, optimizer state), whole: what `save_checkpoint` writes. Every process of a run calls
    it (FSDP2 gathers the shards); the main one writes."""
    return trainable_state_dict(model), optimizer_state_dict(model, optimizer)


def _load_pt(file: Path, mmap: bool = False) -> Any:
    return torch.load(file, weights_only=True, map_location="cpu", mmap=mmap)


def verify(path: Path, params: dict[str, torch.Tensor] | None = None) -> None:
    """Raise a CheckpointError unless every file of checkpoint `path` is present and readable and its weights
    are finite (and fit `params`, when given). The .pt files are opened memory-mapped: their structure is
    read, their tensors are not."""
    read_weights(path, params)
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        read_checkpoint_file(path, name, partial(_load_pt, mmap=True))
    read_state(path)
    read_config(path)


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def save_checkpoint(root: Path, *, model: torch.nn.Module, optimizer, scheduler, state: TrainState,
                    config: dict, keep_last_n: int, is_best: bool = False,
                    gathered: tuple[dict[str, torch.Tensor], dict] | None = None) -> Path:
    """Write `root/step-<state.step>` atomically, mark it best if asked, prune to `keep_last_n` (+ best).
    `gathered`: `gather(model, optimizer)` already made (on several processes, by all of them)."""
    weights, optimizer_state = gathered if gathered is not None else gather(model, optimizer)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(TMP_PREFIX + "*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{state.step}"
    tmp = root / (TMP_PREFIX + name)
    tmp.mkdir()
    save_file(weights, str(tmp / WEIGHTS), metadata={"step": str(state.step)})
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=2))
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for f in tmp.iterdir():
        _fsync(f)
    (tmp / COMPLETE).write_text(f"{state.step} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    _fsync(tmp / COMPLETE)
    _fsync(tmp)
    final = root / name
    if final.exists():  # the same step saved again (e.g. interrupted right after a resume)
        shutil.rmtree(final)
    os.rename(tmp, final)
    if is_best:
        _write_text_atomic(root / BEST, name + "\n")
    _fsync(root)
    prune(root, keep_last_n)
    return final


def prune(root: Path, keep_last_n: int) -> list[Path]:
    """Remove all but the newest `keep_last_n` complete checkpoints, never the best one."""
    found = complete_checkpoints(root)
    best = best_checkpoint(root)
    removed = []
    for path in found[:-keep_last_n] if keep_last_n > 0 else found:
        if best is not None and path.resolve() == best.resolve():
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


# ---------------------------------------------------------------- resume


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _as_today(saved: dict) -> dict:
    """A checkpoint's config as this gemcut reads it: fields added since it was saved take their defaults, so
    an upgrade alone never refuses a resume (a config that no longer validates is compared as it is)."""
    from pydantic import ValidationError

    from gemcut.config import RunConfig

    try:
        return RunConfig.model_validate(saved).model_dump(mode="json")
    except (ValidationError, ValueError, TypeError):
        return saved


def check_compatible(path: Path, *, data_hash: str, config: dict) -> None:
    """Refuse to resume from `path` when the data or the training-relevant config differ."""
    path = Path(path)
    state = read_state(path)
    if state.get("data_hash") != data_hash:
        raise TrainingError(
            f"{path}: the training data changed since this checkpoint (data hash {state.get('data_hash')!r}, "
            f"now {data_hash!r}); resume needs the same data, or start a new run with another output.name"
        )
    saved = _flatten(_as_today(read_config(path)))
    now = _flatten(config)
    differ = [k for k in sorted(set(saved) | set(now))
              if saved.get(k) != now.get(k) and not k.startswith(RESUME_MAY_DIFFER)]
    if differ:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in differ[:5])
        raise TrainingError(
            f"{path}: the config differs from the one this checkpoint was made with ({shown}); "
            "resume with the same config, or start a new run with another output.name"
        )


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer, scheduler) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG states in place; return the training position."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    if _sharded(model):  # each process keeps its shard of the whole weights
        set_model_state_dict(model, read_weights(path, trainable_parameters(model)),
                             options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        load_trainable(model, path)
    saved = read_checkpoint_file(path, "optimizer.pt", _load_pt)
    try:
        set_optimizer_state_dict(model, _raw(optimizer), optim_state_dict=saved, options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as e:  # a state for other parameters (or from an older gemcut)
        raise CheckpointError(f"{path}: optimizer.pt does not fit this model's trainable parameters ({e}); "
                              "resume from another checkpoint or start a new run") from e
    scheduler.load_state_dict(read_checkpoint_file(path, "scheduler.pt", _load_pt))
    set_rng_state(read_checkpoint_file(path, "rng.pt", _load_pt))
    fields = read_state(path)
    return TrainState(**{f.name: fields[f.name] for f in dataclasses.fields(TrainState) if f.name in fields})


def newest_intact(root: Path, *, before: int, params: dict[str, torch.Tensor] | None = None) -> Path | None:
    """The newest complete checkpoint older than step `before` that `verify` accepts, or None."""
    for path in reversed(complete_checkpoints(root)):
        if checkpoint_step(path) < before:
            try:
                verify(path, params)
                return path
            except CheckpointError:
                continue
    return None


def resume_point(root: Path, resume: bool | str, params: dict[str, torch.Tensor] | None = None) -> Path:
    """The checkpoint to resume from: with `resume=True` the newest complete one, with "step-N" (or "N") that
    one, shown intact by `verify`. A damaged one raises a CheckpointError that names the newest intact
    checkpoint before it and the option that continues from there."""
    root = Path(root)
    if isinstance(resume, str):
        name = resume if resume.startswith("step-") else f"step-{resume}"
        path = root / name
        if not (path / COMPLETE).is_file():
            available = ", ".join(p.name for p in complete_checkpoints(root)) or "none"
            raise TrainingError(f"--resume-from {name}: {path} is not a complete checkpoint; complete checkpoints: {available}")
    else:
        path = latest_checkpoint(root)
        if path is None:
            raise TrainingError(f"--resume: no complete checkpoint in {root}; start without --resume")
    try:
        verify(path, params)
    except CheckpointError as e:
        intact = newest_intact(root, before=checkpoint_step(path), params=params)
        hint = (f"The newest intact checkpoint is {intact}; continue from it with --resume-from {intact.name} "
                "(the checkpoints after it are removed)." if intact is not None else
                "No earlier checkpoint is intact; start a new run (another output.name) without --resume.")
        raise CheckpointError(f"{e}\n{hint}") from None
    return path


def forget_after(root: Path, path: Path, best_step: int | None) -> None:
    """Remove the complete checkpoints newer than `path`: the resumed run retraces their steps. The best marker
    moves back to `best_step`'s checkpoint if it named a removed one."""
    for later in complete_checkpoints(root):
        if checkpoint_step(later) > checkpoint_step(path):
            shutil.rmtree(later)
    marker = Path(root) / BEST
    if marker.is_file() and best_checkpoint(root) is None:
        best = Path(root) / f"step-{best_step}"
        if best_step is not None and (best / COMPLETE).is_file():
            _write_text_atomic(marker, best.name + "\n")
        else:
            marker.unlink()


def start_or_resume(root: Path, *, resume: bool | str, data_hash: str, config: dict, model: torch.nn.Module, optimizer,
                    scheduler, writer: bool = True) -> tuple[TrainState, Path | None]:
    """A fresh state, or with `resume` (see `resume_point`) that checkpoint's, once it is shown intact and made
    from this data and config; returns (state, the checkpoint resumed from or None). Only the `writer` (the
    main process of a run on several) removes the checkpoints after the one resumed."""
    if not resume:
        return TrainState(data_hash=data_hash), None
    path = resume_point(root, resume, trainable_parameters(model))
    check_compatible(path, data_hash=data_hash, config=config)
    state = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    if writer:
        forget_after(root, path, state.best_step)
    return state, path
