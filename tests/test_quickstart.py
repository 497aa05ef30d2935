"""The quickstart's run planning: resume an unfinished run, evaluate a trained one, keep a finished one."""

from gemcut.quickstart import plan_run, quickstart_config


def _config(tmp_path):
    return quickstart_config("generate", [f"output.dir={tmp_path}"])


def test_plan_fresh_resume_evaluate_and_next(tmp_path):
    cfg, mode, says = plan_run(_config(tmp_path))
    assert (mode, cfg.output.name) == ("fresh", "quickstart") and "fresh run" in says

    step = tmp_path / "quickstart" / "checkpoints" / "step-5"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("")
    cfg, mode, says = plan_run(_config(tmp_path))
    assert (mode, cfg.output.name) == ("resume", "quickstart") and "resuming" in says

    (tmp_path / "quickstart" / "final").mkdir()
    cfg, mode, _ = plan_run(_config(tmp_path))
    assert (mode, cfg.output.name) == ("evaluate", "quickstart")

    (tmp_path / "quickstart" / "eval.json").write_text("{}")
    cfg, mode, says = plan_run(_config(tmp_path))
    assert (mode, cfg.output.name) == ("fresh", "quickstart-2") and "is finished and kept" in says


def test_presets_differ_by_task():
    assert quickstart_config("generate").model.name == "smollm2-135m-instruct"
    classify = quickstart_config("classify")
    assert (classify.model.name, classify.objective.kind) == ("minilm-l6", "classify")


def test_quickstart_end_to_end_on_tiny_models(tmp_path):
    """`gemcut quickstart` through the CLI on the generative preset, pointed at a tiny Llama and tiny tweets:
    prepare -> LoRA training -> base vs tuned evaluation -> report -> headline and next commands; then a
    re-run keeps the finished run and starts quickstart-2 beside it."""
    import json
    import re

    from eval_runs import general_file, label_file
    from tiny import save_tiny_llama
    from typer.testing import CliRunner

    from gemcut.cli import app, register_commands

    register_commands()
    model = save_tiny_llama(tmp_path / "tiny-llama")
    overrides = [f"model.name={model}", f"data.train=[{label_file(tmp_path / 'tweets.jsonl', n=90)}]",
                 "data.columns={text: text, label: label}", f"output.dir={tmp_path / 'runs'}",
                 "train.max_steps=4", "train.batch_size=8", "train.precision=fp32", "train.sample_prompts=0",
                 f"eval.forgetting_data={general_file(tmp_path / 'general.jsonl')}", "eval.bootstrap=200",
                 "eval.max_examples=null"]
    first = CliRunner().invoke(app, ["quickstart", *overrides])
    assert first.exit_code == 0, first.output
    said = "".join(first.output.split())  # the console wraps long paths; compare without whitespace
    run_dir = tmp_path / "runs" / "quickstart"
    assert f"startingafreshrunin{run_dir}" in said
    # The headline is the tuned model's margin over the strongest baseline (prompted base, TF-IDF, free-text base).
    assert re.search(r"macro-F1\d\.\d\d,[+-]\d\.\d\d±\d\.\d\d(over|behind)thebestbaseline\(.+\d\.\d\d\)", said), first.output
    assert f"report:{run_dir}/report.html" in said and f"gemcutchat{run_dir}" in said
    assert re.search(r"time:\d+min\d\ds\(prepareandtrain\d+min\d\ds,evaluate\d+min\d\ds\)", said), first.output

    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["n_examples"] == ev["n_in_split"] == 9  # the preset holds out 10% of the 90 tweets; all scored
    assert set(ev["tuned"]) >= {"macro_f1", "accuracy", "confusion", "unparseable"} and "macro_f1" in ev["base"]
    assert ev["forgetting"] is not None
    assert set(ev["baselines"]) == {"zero_shot", "k_shot", "tfidf"} and ev["best_baseline"]["name"] in {*ev["baselines"], "base"}
    report = (run_dir / "report.html").read_text()
    assert f'data-metric="macro_f1" data-model="tuned">{ev["tuned"]["macro_f1"]:.4f}<' in report and "data:image/png;base64," in report

    again = CliRunner().invoke(app, ["quickstart", *overrides])
    assert again.exit_code == 0, again.output
    assert "isfinishedandkept" in "".join(again.output.split()) and (tmp_path / "runs" / "quickstart-2" / "eval.json").is_file()
