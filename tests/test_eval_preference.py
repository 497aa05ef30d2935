"""Preference data: pairwise accuracy for a reward model (head score) and for a DPO-tuned LM (log-likelihood).

The run folders are written by hand in the layout of docs/architecture.md with `save_final`, so this test
does not depend on the preference training path.
"""

import json

import pytest
import torch
from tiny import save_tiny_bert, save_tiny_llama

from gemcut.config import RunConfig
from gemcut.eval.evaluate import evaluate

torch.set_num_threads(1)

ROWS = [{"prompt": f"say something about {w}", "chosen": f"i love {w}, it is great", "rejected": f"i hate {w}, it is awful"}
        for w in ("the fox", "the dog", "paris", "the weather", "this product", "waiting", "the corpus", "france")]


def hand_run(root, name: str, task: str, base_dir) -> tuple:
    from gemcut.data.templates import ChatTemplate
    from gemcut.models.adapters import apply_adapter
    from gemcut.models.load import load_base, save_final
    from gemcut.run_folder import run_meta

    cfg = RunConfig.model_validate({"model": {"name": str(base_dir)}, "adapter": {"r": 4}, "objective": {"kind": task},
                                    "eval": {"forgetting_data": None, "bootstrap": 100, "num_samples": 2}})
    torch.manual_seed(0)
    model, tok = load_base(cfg.model, task)
    model = apply_adapter(model, cfg.adapter, task)
    with torch.no_grad():  # a trained-looking adapter: non-zero LoRA B, so tuned differs from base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    template = ChatTemplate.from_tokenizer(tok)
    run = root / name
    save_final(model, tok, template, run / "final", meta=run_meta(cfg, task))
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "data").mkdir()
    (run / "data" / "test.jsonl").write_text("".join(json.dumps({**r, "_source": f"pref.jsonl:{i + 1}"}) + "\n" for i, r in enumerate(ROWS)))
    return run


@pytest.mark.parametrize("task", ["reward", "dpo"])
def test_pairwise_accuracy(tmp_path, task):
    base_dir = (save_tiny_bert if task == "reward" else save_tiny_llama)(tmp_path / "base", **({"num_labels": 1} if task == "reward" else {}))
    run = hand_run(tmp_path, task, task, base_dir)
    ev = evaluate(run)
    assert ev["task"] == "preference" and ev["headline"].startswith("pairwise accuracy")
    preds = [json.loads(x) for x in (run / "eval_predictions.jsonl").read_text().splitlines()]
    assert [p["source"] for p in preds] == [f"pref.jsonl:{i + 1}" for i in range(len(ROWS))]
    for who in ("tuned", "base"):
        wins = sum(p[f"{who}_chosen"] > p[f"{who}_rejected"] for p in preds)
        assert ev[who]["pairwise_accuracy"] == pytest.approx(wins / len(ROWS))
    assert [p["tuned_chosen"] for p in preds] != [p["base_chosen"] for p in preds]
    d = ev["deltas"]["pairwise_accuracy"]
    assert d["diff"] == pytest.approx(ev["tuned"]["pairwise_accuracy"] - ev["base"]["pairwise_accuracy"])
    if task == "dpo":
        # The LM's score is the answer's summed log-likelihood: always negative.
        assert all(p["tuned_chosen"] < 0 and p["tuned_rejected"] < 0 for p in preds)
    assert "pairwise_accuracy" in (run / "report.html").read_text()
