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
