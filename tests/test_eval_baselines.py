"""Baselines in every evaluation: constrained label likelihood, few-shot prompts, TF-IDF, the margin headline."""

import json
import math

import pytest
import torch
from eval_runs import train_run
from tiny import tiny_llama, tiny_tokenizer

from gemcut.config import RunConfig
from gemcut.eval.baseline_summary import best_baseline, compare_baselines, margin_headline
from gemcut.eval.baselines import Baseline, few_shot_examples, wanted, with_examples
from gemcut.eval.constrained import constrained_labels, with_label_set
from gemcut.eval.evaluate import evaluate
from gemcut.eval.examples import Example
from gemcut.eval.summary import ModelResults, summarise
from gemcut.eval.tfidf import C_GRID

torch.set_num_threads(1)
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("baselines")


def test_constrained_scores_equal_a_hand_computed_forward_pass():
    """Each label's score is the summed log-probability of its tokens after the prompt (up to the end of turn),
    computed here by hand with one forward pass per (prompt, label); the answer is their argmax."""
    from gemcut.data.templates import ChatTemplate

    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3).eval()
    template = ChatTemplate.from_tokenizer(tok, "chatml", "be brief")
    prompts = [[{"role": "user", "content": f"tweet {i}: i love this {'!' * i}"}] for i in range(5)]
    predictions, scores = constrained_labels(model, tok, template, prompts, LABELS, batch_size=4)
    assert scores.shape == (5, 3)
    for i, prompt in enumerate(prompts):
        start = len(template.prompt_ids(prompt))
        for j, label in enumerate(LABELS):
            ids, weights = template.render([*prompt, {"role": "assistant", "content": label}])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            answer = [t for t in range(start, len(ids)) if weights[t] > 0]
            answer = answer[: next(k for k, t in enumerate(answer) if ids[t] in template.stop_token_ids)]  # up to end of turn
            hand = sum(float(logp[t - 1, ids[t]]) for t in answer)
            assert scores[i, j] == pytest.approx(hand, abs=1e-4)
        assert predictions[i] == LABELS[int(scores[i].argmax())]
    assert all(p in LABELS for p in predictions)  # by construction: never unparseable


def test_the_label_set_is_named_in_the_prompt():
    asked = [{"role": "user", "content": "How does this tweet feel? Tweet: great day"}]
    named = with_label_set(asked, LABELS)
    assert named[-1]["content"].endswith("Answer with one of: negative, neutral, positive.") and asked[-1]["content"].endswith("day")
    already = [{"role": "user", "content": "Negative, neutral or positive? Tweet: meh"}]
    assert with_label_set(already, LABELS) == already


def test_few_shot_examples_are_balanced_seeded_and_precede_the_question():
    train = [Example(f"t:{i}", "label", [{"role": "user", "content": f"text {i}"}], lab, label=lab, text=f"text {i}")
             for i, lab in enumerate(LABELS * 10)]
    shots = few_shot_examples(train, 4, seed=0, by_label=True)
    assert shots == few_shot_examples(train, 4, seed=0, by_label=True) != few_shot_examples(train, 4, seed=1, by_label=True)
    counts = sorted(sum(s.reference == lab for s in shots) for lab in LABELS)
    assert counts == [1, 1, 2]  # as even as 4 over 3 labels allows
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "the question"}]
    conv = with_examples(prompt, shots, LABELS)
    assert conv[0] == prompt[0] and conv[-1] == prompt[-1] and len(conv) == 2 + 2 * len(shots)
    assert [m["content"] for m in conv[2:-1:2]] == [s.reference for s in shots]
    assert all(m["role"] == "assistant" for m in conv[2:-1:2])


def test_tfidf_separates_a_separable_toy_set():
    from gemcut.eval.tfidf import tfidf_predictions

    words = {"positive": "love great", "negative": "hate awful", "neutral": "table chair"}
    train = [(f"{words[lab]} item {i}", lab) for i in range(20) for lab in LABELS]
    val = [(f"so {words[lab]}", lab) for lab in LABELS]
    test = [f"i {words[lab].split()[i % 2]} it" for i in range(6) for lab in LABELS]
    predictions, info = tfidf_predictions(*zip(*train), test, validation=tuple(zip(*val)))
    assert predictions == [lab for i in range(6) for lab in LABELS]
    assert info["n_train"] == 60 and info["validation_macro_f1"] == 1.0 and info["c"] in C_GRID
    # A large train split is fitted once, at scikit-learn's default C (the grid would cost minutes).
    import gemcut.eval.tfidf as tfidf

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tfidf, "GRID_UP_TO", 10)
        again, info = tfidf_predictions(*zip(*train), test, validation=tuple(zip(*val)))
    assert again == predictions and info["c"] == 1.0 and info["validation_macro_f1"] is None and info["grid"] == {}
    with pytest.raises(ValueError, match="at least two"):
        tfidf_predictions(["a", "b"], ["x", "x"], ["c"])


def test_the_headline_is_the_margin_over_the_strongest_baseline():
    refs = ["positive", "negative", "neutral", "positive"] * 10
    tuned = ModelResults(predictions=list(refs[:36]) + ["negative"] * 4)
    weak = ModelResults(predictions=["positive"] * 40)
    strong = ModelResults(predictions=list(refs[:30]) + ["neutral"] * 10)
    base = ModelResults(predictions=[None] * 40)
    summary = summarise("generative_classification", refs, LABELS, tuned, base, n_resamples=200)
    found = [Baseline("zero_shot", "base zero-shot", "prompted", weak), Baseline("tfidf", "TF-IDF + logistic regression", "tfidf", strong)]
    table = compare_baselines("generative_classification", refs, LABELS, tuned, found, n_resamples=200)
    best = best_baseline(summary, table)
    assert best["name"] == "tfidf" and best["value"] == pytest.approx(table["tfidf"]["metrics"]["macro_f1"])
    assert best["value"] > table["zero_shot"]["metrics"]["macro_f1"] > summary["base"]["macro_f1"]
    d = table["tfidf"]["deltas"]["macro_f1"]
    assert d["diff"] == pytest.approx(summary["tuned"]["macro_f1"] - best["value"]) and d["low"] <= d["diff"] <= d["high"]
    text = margin_headline(summary, best)
    assert text == (f"macro-F1 {summary['tuned']['macro_f1']:.2f}, {d['diff']:+.2f} ± {d['half_width']:.2f} over the best "
                    f"baseline (TF-IDF + logistic regression {best['value']:.2f})")
    # When the free-text base is the strongest, it is the one the headline names; a loss reads "behind".
    beaten = summarise("generative_classification", refs, LABELS, weak, ModelResults(predictions=list(refs)), n_resamples=50)
    best = best_baseline(beaten, compare_baselines("generative_classification", refs, LABELS, weak, found, n_resamples=50))
    assert best["name"] == "base" and "behind the best baseline (base (free text) 1.00)" in margin_headline(beaten, best)


def test_which_baselines_apply():
    cfg = RunConfig()
    assert wanted("generative_classification", cfg) == ["zero_shot", "k_shot", "tfidf"] == wanted("classification", cfg)
    assert wanted("generation", cfg) == ["zero_shot", "k_shot"] and wanted("preference", cfg) == []
    assert wanted("classification", RunConfig.model_validate({"eval": {"baselines": "none"}})) == []
    assert wanted("generation", RunConfig.model_validate({"eval": {"baselines": ["k_shot", "tfidf"]}})) == ["k_shot"]


def test_a_generative_classifier_run_reports_every_baseline(root):
    run = train_run(root, "gen")
    ev = evaluate(run)
    assert set(ev["baselines"]) == {"zero_shot", "k_shot", "tfidf"} and ev["baselines_skipped"] == {}
    for name, b in ev["baselines"].items():
        assert b["metrics"]["unparseable"] == 0 and b["metrics"]["n"] == ev["n_examples"], name
        assert b["deltas"]["macro_f1"]["low"] is not None
    assert ev["baselines"]["k_shot"]["info"]["k"] == 4 and len(ev["baselines"]["k_shot"]["info"]["shots"]) == 4
    best = ev["best_baseline"]
    values = {n: b["metrics"]["macro_f1"] for n, b in ev["baselines"].items()} | {"base": ev["base"]["macro_f1"]}
    assert best["value"] == max(values.values()) and values[best["name"]] == best["value"]
    assert ev["headline"].startswith(f"macro-F1 {ev['tuned']['macro_f1']:.2f}, ") and "the best baseline (" in ev["headline"]
    saved = json.loads((run / "eval.json").read_text())
    assert saved["baselines"]["zero_shot"]["metrics"]["unparseable"] == 0
    report = (run / "report.html").read_text()
    for name, b in ev["baselines"].items():
        assert f'data-metric="macro_f1" data-model="baseline:{name}">{b["metrics"]["macro_f1"]:.4f}<' in report
    assert "<h2>Baselines</h2>" in report and "(best)" in report
    # Every baseline's answers are in eval_predictions.jsonl; its macro-F1 recomputed from them by hand.
    from sklearn.metrics import f1_score

    lines = [json.loads(x) for x in (run / "eval_predictions.jsonl").read_text().splitlines()]
    for name, b in ev["baselines"].items():
        answers = [x[f"{name}_label"] for x in lines]
        assert all(a in LABELS for a in answers), name
        hand = f1_score([x["reference"] for x in lines], answers, labels=LABELS, average="macro", zero_division=0)
        assert b["metrics"]["macro_f1"] == pytest.approx(hand), name

    # No baselines: the headline is base -> tuned, as before.
    plain = evaluate(run, overrides=["eval.baselines=none"], report=False)
    assert plain["baselines"] == {} and plain["best_baseline"] is None and " -> " in plain["headline"]


def test_a_classifier_head_on_an_encoder_gets_tfidf_and_says_why_not_more(root):
    run = train_run(root, "cls", model="bert", objective="classify")
    ev = evaluate(run, report=False, overrides=["eval.forgetting_data=none"])
    assert set(ev["baselines"]) == {"tfidf"} and set(ev["baselines_skipped"]) == {"zero_shot", "k_shot"}
    assert "not a causal LM" in ev["baselines_skipped"]["zero_shot"]


def test_a_classifier_head_on_a_causal_lm_prompts_that_lm(root):
    run = train_run(root, "cls-llama", model="llama", objective="classify")
    ev = evaluate(run, report=False, overrides=["eval.forgetting_data=none"])
    assert set(ev["baselines"]) == {"zero_shot", "k_shot", "tfidf"} and ev["baselines_skipped"] == {}
    assert all(b["metrics"]["unparseable"] == 0 for b in ev["baselines"].values())


def test_generation_runs_get_zero_and_k_shot(root):
    run = train_run(root, "sft", records="completion")
    ev = evaluate(run, report=False, overrides=["eval.k_shot=2"])
    assert set(ev["baselines"]) == {"zero_shot", "k_shot"}
    zero = ev["baselines"]["zero_shot"]
    assert zero["info"]["same_as"] == "base" and zero["metrics"]["rougeL"] == pytest.approx(ev["base"]["rougeL"])
    assert ev["baselines"]["k_shot"]["info"]["k"] == 2 and math.isfinite(ev["baselines"]["k_shot"]["metrics"]["rougeL"])
    assert "exact_match" in ev["baselines"]["k_shot"]["deltas"] and ev["headline"].startswith("ROUGE-L ")


def reward_run(root):
    """A reward-model run folder written by hand (tiny BERT, one output, LoRA), the layout gemcut.train writes."""
    from tiny import save_tiny_bert

    from gemcut.data.templates import ChatTemplate
    from gemcut.models.adapters import apply_adapter
    from gemcut.models.load import load_base, save_final
    from gemcut.run_folder import run_meta

    cfg = RunConfig.model_validate({"model": {"name": str(save_tiny_bert(root / "judge-base", num_labels=1))},
                                    "adapter": {"r": 4}, "objective": {"kind": "reward"}})
    torch.manual_seed(0)
    model, tok = load_base(cfg.model, "reward")
    model = apply_adapter(model, cfg.adapter, "reward")
    run = root / "judge"
    save_final(model, tok, ChatTemplate.from_tokenizer(tok), run / "final", meta=run_meta(cfg, "reward"))
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


def test_a_reward_model_judges_tuned_answers_against_the_baselines(root):
    from gemcut.eval.examples import read_split, to_example
    from gemcut.models.load import load_run

    judge_dir = reward_run(root)
    run = train_run(root, "sft-judged", records="completion")
    ev = evaluate(run, overrides=[f"eval.judge={judge_dir}", "eval.k_shot=2"])
    vs = ev["judge"]["vs"]
    assert set(vs) == {"zero_shot", "k_shot"} and ev["judge"]["run"] == str(judge_dir)
    # The zero-shot comparison by hand: the judge's score of each prompt + answer, tuned against base.
    judge = load_run(judge_dir)
    cfg = RunConfig.model_validate_json(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    examples = [to_example(r, data_cfg=cfg.data) for r in read_split(run, "test")]
    lines = [json.loads(x) for x in (run / "eval_predictions.jsonl").read_text().splitlines()]

    def score(e, answer):
        ids = judge.template.render([*e.prompt, {"role": "assistant", "content": answer}])[0]
        with torch.no_grad():
            return float(judge.model(input_ids=torch.tensor([ids])).logits[0, 0])

    tuned = [score(e, x["tuned_text"]) for e, x in zip(examples, lines)]
    base = [score(e, x["base_text"]) for e, x in zip(examples, lines)]
    same = [x["tuned_text"] == x["base_text"] for x in lines]
    wins = sum(t > b and not s for t, b, s in zip(tuned, base, same))
    ties = sum(s or t == b for t, b, s in zip(tuned, base, same))
    assert (vs["zero_shot"]["wins"], vs["zero_shot"]["ties"]) == (wins, ties)
    assert vs["zero_shot"]["win_rate"] == pytest.approx((wins + ties / 2) / len(lines))
    assert vs["zero_shot"]["tuned_mean"] == pytest.approx(sum(tuned) / len(tuned), abs=1e-4)
    assert 'data-metric="judge_win_rate" data-model="baseline:k_shot"' in (run / "report.html").read_text()
    # A judge that is not a reward model is refused with the fix.
    with pytest.raises(Exception, match="not a reward model"):
        evaluate(run, report=False, overrides=[f"eval.judge={run}"])


def test_pairwise_win_rate_counts_ties_half():
    from gemcut.eval.judge import pairwise

    w = pairwise([3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 4.9999], [False, False, False, True], n_resamples=100)
    assert (w["wins"], w["ties"], w["losses"]) == (1, 2, 1) and w["win_rate"] == pytest.approx(0.5)
    assert w["low"] <= 0.5 <= w["high"] and w["n"] == 4
