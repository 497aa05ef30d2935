"""The run-folder format (gemcut/run_folder.py): gemcut_run.json, finding checkpoints, reading their weights.

    python -m pytest -q tests/test_run_folder.py
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from gemcut import run_folder
from gemcut.errors import GemcutError


def checkpoint(root, step: int, *, complete: bool = True, weights: dict | None = None):
    path = root / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    if weights is not None:
        save_file(weights, str(path / run_folder.WEIGHTS))
    if complete:
        (path / run_folder.COMPLETE).write_text(f"{step}\n")
    return path


def test_run_meta_round_trip_and_absent(tmp_path):
    meta = run_folder.run_meta({"model": {"name": "tiny"}, "adapter": {"method": "lora"}}, "causal_lm", ["a"])
    assert meta == {"base_model": "tiny", "base_path": None, "task": "causal_lm", "adapter": "lora", "labels": ["a"],
                    "config": {"model": {"name": "tiny"}, "adapter": {"method": "lora"}}}
    run_folder.write_run_meta(tmp_path / "run", meta)
    assert run_folder.read_run_meta(tmp_path / "run") == meta
    assert not list((tmp_path / "run").glob("*.tmp-*"))  # written under a temporary name, then renamed
    assert run_folder.read_run_meta(tmp_path) is None


def test_find_checkpoint_by_name_ignores_unfinished_ones(tmp_path):
    for step in (2, 10):
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 12, complete=False)  # killed while saving
    (tmp_path / "checkpoints" / "best").write_text("step-2\n")
    assert run_folder.find_checkpoint(tmp_path, "last").name == "step-10"  # by number, not by name order
    assert run_folder.find_checkpoint(tmp_path, "best").name == "step-2"
    assert run_folder.find_checkpoint(tmp_path, "step-10").name == "step-10"
    with pytest.raises(GemcutError, match="step-12: not a complete checkpoint .*complete checkpoints: step-2, step-10"):
        run_folder.find_checkpoint(tmp_path, "step-12")
    with pytest.raises(GemcutError, match="not one of final, best, last, step-N"):
        run_folder.find_checkpoint(tmp_path, "newest")


def test_a_run_without_checkpoints_says_so(tmp_path):
    with pytest.raises(GemcutError, match="no best checkpoint marked .*complete checkpoints: none"):
        run_folder.find_checkpoint(tmp_path, "best")
    with pytest.raises(GemcutError, match="no complete checkpoint under checkpoints/"):
        run_folder.find_checkpoint(tmp_path, "last")


def test_load_trainable_copies_only_matching_finite_weights(tmp_path):
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen: not in the checkpoint
    weight = torch.arange(6.0).reshape(2, 3)
    path = checkpoint(tmp_path, 1, weights={"weight": weight})
    run_folder.load_trainable(model, path)
    assert torch.equal(model.weight.detach(), weight)
    wrong = checkpoint(tmp_path, 2, weights={"weight": torch.zeros(1, 3)})
    with pytest.raises(run_folder.CheckpointError, match=r"weight is \[1, 3\] there, \[2, 3\] in the model"):
        run_folder.load_trainable(model, wrong)
    bad = checkpoint(tmp_path, 3, weights={"weight": torch.full((2, 3), float("nan"))})
    with pytest.raises(run_folder.CheckpointError, match="6 of 6 weights that are nan or inf"):
        run_folder.load_trainable(model, bad)
    with pytest.raises(run_folder.CheckpointError, match="config.yaml is missing"):
        run_folder.read_config(path)
