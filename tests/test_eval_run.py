"""evaluate(), select_checkpoint(), report.html and compare on tiny runs trained by gemcut.train itself."""

import base64
import json
import math
from html.parser import HTMLParser

import pytest
import torch
from eval_runs import train_run
from typer.testing import CliRunner

from gemcut.eval.checkpoint_choice import select_checkpoint
from gemcut.eval.evaluate import evaluate

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def gen_run(root):
    return train_run(root, "gen")


@pytest.fixture(scope="module")
def gen_eval(gen_run):
    return evaluate(gen_run)


class ReportParser(HTMLParser):
    """Collects number cells (data-metric/data-model), images, and the headline of a report page."""

    def __init__(self):
        super().__init__()
        self.cells, self.images, self.headline = {}, [], ""
        self._cell = None
        self._in_headline = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if "data-metric" in a:
            key = (a.get("data-class"), a["data-metric"], a.get("data-model") or a.get("data-run"))
            self._cell = key
            self.cells[key] = ""
        if a.get("id") == "headline":
            self._in_headline = True

    def handle_endtag(self, tag):
        if tag in ("td", "span"):
            self._cell = None
        if tag == "p":
            self._in_headline = False

    def handle_data(self, data):
        if self._cell is not None:
            self.cells[self._cell] += data
        if self._in_headline:
            self.headline += data


def parse(path):
    p = ReportParser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def predictions(run):
    return [json.loads(line) for line in (run / "eval_predictions.jsonl").read_text().splitlines()]


def test_generative_classifier_evaluation(gen_run, gen_eval):
    ev = gen_eval
    assert json.loads((gen_run / "eval.json").read_text()) == json.loads(json.dumps(ev))
    n_test = len((gen_run / "data" / "test.jsonl").read_text().splitlines())
    assert ev["task"] == "generative_classification" and ev["n_examples"] == n_test and ev["n_left_out"] == 0
    preds = predictions(gen_run)
    assert len(preds) == n_test
    for who in ("tuned", "base"):
        m = ev[who]
        # Unparseable answers are counted, shown in their own column, and never silently scored.
        assert m["unparseable"] == sum(p[f"{who}_label"] is None for p in preds)
        assert m["label_mapping"]["unparseable"] == m["unparseable"] and sum(m["label_mapping"].values()) == n_test
        matrix = m["confusion"]["matrix"]
        assert sum(map(sum, matrix)) == n_test and sum(row[-1] for row in matrix) == m["unparseable"]
        correct = sum(p[f"{who}_label"] == p["reference"] for p in preds)
        assert m["accuracy"] == pytest.approx(correct / n_test)
    if ev["tuned"]["unparseable"]:
        assert any("matched no label" in w for w in ev["warnings"])
    d = ev["deltas"]["macro_f1"]
    assert d["diff"] == pytest.approx(ev["tuned"]["macro_f1"] - ev["base"]["macro_f1"])
    assert d["low"] <= d["diff"] + 1e-12 and d["diff"] <= d["high"] + 1e-12
    assert ev["headline"].startswith("macro-F1 ")
    assert len(ev["samples"]) == 4 and {"prompt", "reference", "base", "tuned"} <= set(ev["samples"][0])


def test_base_is_the_adapter_disabled_model(gen_run, gen_eval):
    # The base scores must be those of the plain base weights, loaded on their own.
    from transformers import AutoModelForCausalLM

    from gemcut.data.templates import ChatTemplate
    from gemcut.eval import scoring
    from gemcut.eval.forgetting import forgetting_examples
    from gemcut.eval.task_scoring import reference_targets
    from gemcut.models.load import load_tokenizer

    base_dir = gen_run.parent.parent / "base-llama"
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tok = load_tokenizer(base_dir)
    template = ChatTemplate.from_tokenizer(tok)
    f = gen_eval["forgetting"]
    examples, _ = forgetting_examples(f["data"])
    targets = [reference_targets(e, tok, template, 512) for e in examples]
    nll = scoring.sequence_nll(model, [t[0] for t in targets], [t[1] for t in targets])
    ppl = math.exp(sum(x[0] for x in nll) / sum(x[1] for x in nll))
    assert f["perplexity_base"] == pytest.approx(ppl, rel=1e-5)
    assert f["perplexity_tuned"] != pytest.approx(ppl, rel=1e-3)
    assert f["relative_change"] == pytest.approx(f["perplexity_tuned"] / f["perplexity_base"] - 1)
    assert (f["warning"] is not None) == (f["relative_change"] > f["margin"])


def test_report_holds_the_numbers_and_pictures(gen_run, gen_eval):
    p = parse(gen_run / "report.html")
    ev = gen_eval
    assert p.headline.strip() == ev["headline"]
    for metric in ("macro_f1", "accuracy", "weighted_f1", "loss"):
        for who in ("base", "tuned"):
            assert float(p.cells[(None, metric, who)]) == pytest.approx(ev[who][metric], abs=5e-5)
        assert float(p.cells[(None, metric, "delta")]) == pytest.approx(ev["deltas"][metric]["diff"], abs=5e-5)
    for lab, row in ev["tuned"]["per_class"].items():
        assert float(p.cells[(lab, "f1", "tuned")]) == pytest.approx(row["f1"], abs=5e-5)
    assert float(p.cells[(None, "forgetting_perplexity", "base")]) == pytest.approx(ev["forgetting"]["perplexity_base"], abs=5e-5)
    pngs = [a for a in p.images if a["src"].startswith("data:image/png;base64,")]
    assert len(pngs) == len(p.images) >= 3  # loss curves, base and tuned confusion matrices; nothing external
    for a in pngs:
        assert base64.b64decode(a["src"].split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    alts = " ".join(a["alt"] for a in pngs)
    assert "training and validation loss" in alts and "tuned confusion matrix" in alts
    html = (gen_run / "report.html").read_text()
    assert "unparseable" in html and "<script" not in html and ev["samples"][0]["reference"] in html


def test_select_checkpoint_agrees_with_the_loop(gen_run):
    out = select_checkpoint(gen_run, "val_loss")
    assert out["metric"] == "loss" and not out["higher_is_better"]
    logged = {r["step"]: r["val_loss"] for r in map(json.loads, (gen_run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r}
    assert [r["name"] for r in out["checkpoints"]] == ["step-2", "step-4", "step-6"]
    for r in out["checkpoints"]:
        # Evaluation recomputes the loop's validation loss of each checkpoint.
        assert r["value"] == pytest.approx(logged[r["step"]], rel=1e-4)
    best = min(out["checkpoints"], key=lambda r: r["value"])
    assert out["best"] == best["name"] and [r["best"] for r in out["checkpoints"]].count(True) == 1
    assert out["best"] == out["loop_best"]
    assert out["final_step"] == 6 and out["final_is_best"] == (best["step"] == 6)
    assert json.loads((gen_run / "checkpoints.json").read_text())["best"] == out["best"]
    by_f1 = select_checkpoint(gen_run, "macro_f1", max_examples=6)
    assert by_f1["higher_is_better"] and by_f1["metric"] == "macro_f1"


def test_classifier_head_runs(root):
    for adapter in ("lora", "full"):
        run = train_run(root, f"cls-{adapter}", model="bert", objective="classify", adapter=adapter)
        ev = evaluate(run, max_examples=8)
        assert ev["task"] == "classification" and ev["n_examples"] == 8 and ev["n_left_out"] == ev["n_in_split"] - 8
        assert ev["tuned"]["unparseable"] == 0 and ev["forgetting"]["skipped"]
        assert set(ev["tuned"]["per_class"]) == {"negative", "neutral", "positive"}
        assert "perplexity" not in ev["tuned"] and ev["base"]["loss"] > 0
        assert ev["deltas"]["accuracy"]["low"] is not None
        # The last checkpoint is what final/ holds: its validation loss is the loop's last val_loss.
        last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x][-1]
        again = evaluate(run, split="validation", base=False, report=False)
        assert again["base"] is None and again["deltas"] == {}
        assert again["tuned"]["loss"] == pytest.approx(last["val_loss"], rel=1e-4)


def test_generation_run_and_compare(root, gen_run, gen_eval, tmp_path):
    from gemcut.cli import app, register_commands
    from gemcut.eval.compare import compare

    run = train_run(root, "sft", records="completion")
    ev = evaluate(run)
    assert ev["task"] == "generation" and ev["headline"].startswith("ROUGE-L ")
    for key in ("exact_match", "rouge1", "rouge2", "rougeL", "bleu", "perplexity", "loss"):
        assert key in ev["tuned"] and key in ev["deltas"]
    assert ev["tuned"]["perplexity"] == pytest.approx(math.exp(ev["tuned"]["loss"]))
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x][-1]
    again = evaluate(run, split="validation", base=False, report=False)
    assert again["tuned"]["loss"] == pytest.approx(last["val_loss"], rel=1e-4)

    # Two evaluations of the same examples compare with paired intervals.
    other = train_run(root, "gen-b", steps=4)
    evaluate(other)
    result = compare(gen_run, other, out=tmp_path / "compare.html")
    assert result["paired"], result["why_unpaired"]
    row = next(r for r in result["rows"] if r["metric"] == "loss")
    ev_b = json.loads((other / "eval.json").read_text())
    assert row["diff"] == pytest.approx(ev_b["tuned"]["loss"] - gen_eval["tuned"]["loss"])
    assert row["low"] <= row["diff"] <= row["high"]
    p = parse(tmp_path / "compare.html")
    assert float(p.cells[(None, "loss", "a")]) == pytest.approx(gen_eval["tuned"]["loss"], abs=5e-5)
    assert all(a["src"].startswith("data:image/png;base64,") for a in p.images) and p.images
    unpaired = compare(gen_run, run, out=tmp_path / "c2.html")
    assert not unpaired["paired"] and "different tasks" in unpaired["why_unpaired"]

    register_commands()
    out = CliRunner().invoke(app, ["eval", str(run), "--no-base", "--max-examples", "3"])
    assert out.exit_code == 0, out.output
    assert "rougeL" in out.output and "ROUGE-L" in out.output and "report.html" in out.output
    out = CliRunner().invoke(app, ["compare", str(gen_run), str(other), "--out", str(tmp_path / "c3.html")])
    assert out.exit_code == 0, out.output
    assert "macro_f1" in out.output and (tmp_path / "c3.html").is_file()


def test_forgetting_task_accuracy_on_answered_general_data(root):
    """A general set of labelled records also gets task accuracy, base vs tuned. Pointed at the run's own test
    split, those accuracies must equal the main evaluation's: same prompts, same generation, same mapping."""
    general = root / "answered-general.jsonl"
    run = train_run(root, "gen-forget", steps=4, forgetting_data=str(general))
    rows = [json.loads(x) for x in (run / "data" / "test.jsonl").read_text().splitlines()]
    general.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))
    ev = evaluate(run)
    task = ev["forgetting"]["task"]
    assert task["metric"] == "accuracy"
    assert task["base"] == pytest.approx(ev["base"]["accuracy"]) and task["tuned"] == pytest.approx(ev["tuned"]["accuracy"])
    assert task["delta"]["diff"] == pytest.approx(task["tuned"] - task["base"])
    p = parse(run / "report.html")
    assert float(p.cells[(None, "forgetting_accuracy", "tuned")]) == pytest.approx(task["tuned"], abs=5e-5)
    assert float(p.cells[(None, "forgetting_accuracy", "base")]) == pytest.approx(task["base"], abs=5e-5)


def test_forgetting_task_is_none_for_conversations(gen_eval):
    assert gen_eval["forgetting"]["task"] is None  # chit-chat has many good answers: perplexity only


def test_eval_overrides_and_a_forgetting_set_the_run_trained_on(root, gen_run):
    from gemcut.errors import ConfigError
    from gemcut.eval.evaluate import run_config

    assert run_config(gen_run, overrides=["eval.forgetting_data=none"]).eval.forgetting_data is None
    assert run_config(gen_run, overrides=["eval.max_examples=3"]).eval.max_examples == 3
    with pytest.raises(ConfigError, match="gemcut eval changes eval.\\* settings only"):
        run_config(gen_run, overrides=["train.lr=1"])
    trained_on = str(root / "labels.jsonl")  # the run's own data.train
    ev = evaluate(gen_run, overrides=[f"eval.forgetting_data={trained_on}", "eval.max_examples=4"], report=False)
    assert ev["n_examples"] == 4
    f = ev["forgetting"]
    assert f["in_training_data"] is True and "perplexity_base" not in f
    assert f["skipped"] == (f"eval.forgetting_data={trained_on} is part of this run's training data (data.train), so it measures "
                            "fit, not forgetting; pass eval.forgetting_data=chitchat (or another set the run did not train on) "
                            "or eval.forgetting_data=none")
    assert f["skipped"] in ev["warnings"]
