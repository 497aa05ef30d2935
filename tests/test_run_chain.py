"""One run as the base of the next: `model.name: runs/sft1` for DPO and reward runs (docs/preferences.md).

    python -m pytest -q tests/test_run_chain.py
"""

from __future__ import annotations

import json

import pytest
import torch
from eval_runs import train_run

from gemcut.config import RunConfig
from gemcut.errors import ModelNotFoundError
from gemcut.models.load import load_run
from gemcut.models.resolve import resolve_model

torch.set_num_threads(1)

PAIRS = [{"prompt": f"what is {i} plus one?", "chosen": f"the answer is {i + 1}.", "rejected": f"the answer is {i + 7}."}
         for i in range(24)]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    return root, train_run(root, "sft", records="completion", steps=2)


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def next_run(root, name: str, base, objective: str):
    from gemcut.train.run import train

    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    cfg = RunConfig.model_validate({
        "data": {"train": [str(data)], "split": {"validation": 0.2, "test": 0.2}},
        "model": {"name": str(base)}, "adapter": {"method": "lora", "r": 4}, "objective": {"kind": objective},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "sample_prompts": 0, "warmup_steps": 0},
        "eval": {"forgetting_data": None}, "output": {"dir": str(root / "runs"), "name": name},
    })
    return train(cfg)


def test_a_lora_run_resolves_to_its_merged_weights_once(sft):
    from transformers import AutoModelForCausalLM

    _, run = sft
    merged = resolve_model(str(run))
    assert merged == (run / "merged").resolve()
    ids = list(range(3, 40))
    tuned = load_run(run).model  # base + the run's adapter
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(merged), ids), logits(tuned, ids), atol=1e-5)
    assert "template.json" in {p.name for p in merged.iterdir()}  # the next run prompts as this one trained
    stamp = (merged / "gemcut_merged_from.json").stat().st_mtime_ns
    assert resolve_model(str(run / "final")) == merged  # final/ of a LoRA run names the same weights
    assert (merged / "gemcut_merged_from.json").stat().st_mtime_ns == stamp  # not merged twice


def test_dpo_starts_from_the_sft_model_and_it_is_the_reference(sft):
    root, run = sft
    dpo = next_run(root, "dpo", run, "dpo")
    first = json.loads((dpo / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931, abs=2e-3)  # policy == reference at the start: -log sigmoid(0)
    loaded = load_run(dpo)
    ids = list(range(3, 40))
    with loaded.model.disable_adapter():  # DPO's reference: the same model with its adapter off
        reference = logits(loaded.model, ids)
    assert torch.allclose(reference, logits(load_run(run).model, ids), atol=1e-5)


def test_reward_model_starts_from_the_sft_weights(sft):
    root, run = sft
    reward = next_run(root, "reward", run, "reward")
    loaded = load_run(reward)
    merged = resolve_model(str(run))
    from safetensors.torch import load_file

    sft_weights = load_file(merged / "model.safetensors")
    base_weights = load_file(root / "base-llama" / "model.safetensors")
    backbone = loaded.model.get_base_model().model.state_dict()
    # The reward run's own LoRA wraps this Linear; under it lie the SFT-merged weights, not the original base's.
    under = backbone.get("layers.0.mlp.down_proj.base_layer.weight", backbone.get("layers.0.mlp.down_proj.weight"))
    assert torch.equal(under, sft_weights["model.layers.0.mlp.down_proj.weight"])
    assert not torch.equal(under, base_weights["model.layers.0.mlp.down_proj.weight"])


def test_an_unfinished_run_is_named_with_the_fix(tmp_path):
    run = tmp_path / "half"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name: x}\n")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(str(run))
    assert str(err.value) == (f"{run}: this run has not finished (no final/gemcut_run.json), so it has no weights to start "
                              f"from; finish it with `gemcut train {run / 'config.yaml'} --resume`, or name another model")
