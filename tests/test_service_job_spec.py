"""A fine-tuning job request -> a validated run config (gemcut/service/job_spec.py): each method and
hyperparameter, auto and explicit; gemcut overrides accepted and refused; every JobSpecError's param; and the
config of each method, on a file the upload check passed, trains a tiny model (as the worker will run it).

    python -m pytest -q tests/test_service_job_spec.py
"""

from __future__ import annotations

import json

import pytest
from tiny import CORPUS, save_tiny_llama

from gemcut.config import RunConfig
from gemcut.service.job_spec import LABEL_INSTRUCTION, JobSpecError, job_spec
from gemcut.service.uploads import validate_upload

GRADER = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}
KIND_OF = {"supervised": "messages", "dpo": "preference", "reinforcement": "messages"}


def spec(method: dict | None = None, *, kind: str | None = None, validation: bool = False, counts: dict | None = None, **request):
    body = {"model": "smollm2-135m-instruct", "training_file": "file-abc", **request}
    if method is not None:
        body["method"] = method
    kind = kind or KIND_OF[(method or {}).get("type", "supervised")]
    return job_spec(body, base_model_source="/srv/models/smollm2", training_kind=kind, validation=validation, seed_default=7,
                    training_counts=counts)


def error(method: dict | None = None, **kwargs) -> JobSpecError:
    with pytest.raises(JobSpecError) as info:
        spec(method, **kwargs)
    return info.value


def rl(hyperparameters: dict | None = None, grader: dict | None = GRADER) -> dict:
    body: dict = {"grader": grader}
    if hyperparameters is not None:
        body["hyperparameters"] = hyperparameters
    return {"type": "reinforcement", "reinforcement": body}


# ---------------------------------------------------------------- methods and their hyperparameters


def test_supervised_auto_on_chats():
    s = spec({"type": "supervised"})
    assert s.method == {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 8, "learning_rate_multiplier": 1.0, "n_epochs": 3}}}
    assert s.hyperparameters == {"batch_size": 8, "learning_rate_multiplier": 1.0, "n_epochs": 3}
    assert s.seed == 7
    c = s.config
    assert c["model"]["name"] == "/srv/models/smollm2" and c["adapter"]["method"] == "lora"
    assert c["objective"]["kind"] == "causal_lm"
    assert (c["data"]["format"], c["data"]["kind"]) == ("jsonl", "messages")
    t = c["train"]
    assert (t["epochs"], t["batch_size"], t["lr"], t["seed"]) == (3, 8, 2e-4, 7)
    assert (t["save_every"], t["keep_last_n"], t["eval_every"]) == (10, 3, None)  # resumable; validated at the end
    assert RunConfig.model_validate(c).model_dump(mode="json") == c


def test_a_validation_file_validates_while_the_job_runs():
    assert spec({"type": "supervised"}, validation=True).config["train"]["eval_every"] == 20


def test_supervised_explicit_hyperparameters():
    s = spec({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}}})
    assert s.hyperparameters == {"batch_size": 4, "learning_rate_multiplier": 0.5, "n_epochs": 2}
    assert (s.config["train"]["epochs"], s.config["train"]["batch_size"], s.config["train"]["lr"]) == (2, 4, 1e-4)


@pytest.mark.parametrize("examples, epochs, batch", [(10, 10, 8), (5, 20, 5), (1, 25, 1), (1000, 3, 8), (20000, 1, 8), (None, 3, 8)])
def test_auto_epochs_and_batch_follow_the_number_of_examples(examples, epochs, batch):
    s = spec({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto", "batch_size": "auto"}}},
             counts=None if examples is None else {"examples": examples})
    assert (s.hyperparameters["n_epochs"], s.hyperparameters["batch_size"]) == (epochs, batch)
    assert (s.config["train"]["epochs"], s.config["train"]["batch_size"]) == (epochs, batch)


def test_the_legacy_hyperparameters_mean_supervised():
    s = spec(None, hyperparameters={"n_epochs": 4, "batch_size": "auto", "learning_rate_multiplier": 2})
    assert s.method == {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 8, "learning_rate_multiplier": 2.0, "n_epochs": 4}}}
    assert s.config["train"]["lr"] == pytest.approx(4e-4)


def test_dpo_beta_auto_and_explicit():
    auto = spec({"type": "dpo"})
    assert auto.config["objective"]["kind"] == "dpo" and auto.config["objective"]["dpo"]["beta"] == 0.1
    assert auto.method["dpo"]["hyperparameters"] == {"batch_size": 8, "learning_rate_multiplier": 1.0, "n_epochs": 3, "beta": 0.1}
    assert auto.hyperparameters == {"batch_size": 8, "learning_rate_multiplier": 1.0, "n_epochs": 3}
    given = spec({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "learning_rate_multiplier": 0.1}}})
    assert given.config["objective"]["dpo"]["beta"] == 0.3 and given.config["train"]["lr"] == pytest.approx(2e-5)


def test_labels_learn_as_a_generative_classifier_unless_gemcut_says_classify():
    generative = spec({"type": "supervised"}, kind="label")
    assert generative.config["objective"]["kind"] == "causal_lm" and generative.config["data"]["instruction"] == LABEL_INSTRUCTION
    head = spec({"type": "supervised"}, kind="label", gemcut={"objective.kind": "classify"})
    assert head.config["objective"]["kind"] == "classify" and head.config["data"]["instruction"] != LABEL_INSTRUCTION


def test_text_is_continued_pretraining():
    s = spec({"type": "supervised"}, kind="text")
    assert (s.config["objective"]["kind"], s.config["data"]["kind"]) == ("causal_lm", "text")


def test_reinforcement_carries_its_grader_into_the_config():
    s = spec(rl(), counts={"examples": 40, "item_fields": ["answer"], "without_reply": 40})
    c = s.config
    assert c["objective"]["kind"] == "grpo"
    assert {k: v for k, v in c["objective"]["rl"]["grader"].items() if v is not None} == GRADER
    assert c["data"]["extra_fields"] == "keep" and c["data"]["prompts_only"] is True
    assert s.method["reinforcement"]["grader"] == GRADER
    assert s.method["reinforcement"]["hyperparameters"] == {
        "batch_size": 4, "learning_rate_multiplier": 1.0, "n_epochs": 1, "compute_multiplier": 1.0, "eval_interval": None,
        "eval_samples": 24, "reasoning_effort": "default"}
    assert (c["train"]["lr"], c["objective"]["rl"]["group_size"]) == (5e-4, 4)


def test_reinforcement_hyperparameters_map_onto_grpo():
    s = spec(rl({"compute_multiplier": 2, "eval_interval": 5, "eval_samples": 10, "n_epochs": 2, "batch_size": 2,
                 "learning_rate_multiplier": 2, "reasoning_effort": "default"}))
    c = s.config
    assert (c["objective"]["rl"]["group_size"], c["train"]["eval_every"], c["train"]["val_max_examples"]) == (8, 5, 10)
    assert (c["train"]["epochs"], c["train"]["batch_size"], c["train"]["lr"]) == (2, 2, 1e-3)
    assert s.method["reinforcement"]["hyperparameters"]["compute_multiplier"] == 2.0


def test_seed_suffix_and_metadata_that_are_allowed():
    s = spec({"type": "supervised"}, seed=123, suffix="my-model_v1.2", metadata={"team": "nlp", "k" * 64: "v" * 512})
    assert s.seed == 123 and s.config["train"]["seed"] == 123


# ---------------------------------------------------------------- extra_body.gemcut


def test_gemcut_overrides_nested_and_dotted_are_applied():
    s = spec({"type": "supervised"}, gemcut={"adapter": {"method": "lora", "r": 8}, "eval": {"max_examples": 50},
                                             "train.warmup_steps": 2, "data": {"columns": {"messages": "conversation"}},
                                             "eval.forgetting_data": "none"})
    c = s.config
    assert (c["adapter"]["r"], c["eval"]["max_examples"], c["train"]["warmup_steps"]) == (8, 50, 2)
    assert c["data"]["columns"] == {"messages": "conversation"} and c["eval"]["forgetting_data"] is None


def test_an_empty_section_overrides_nothing():
    assert spec({"type": "supervised"}, gemcut={"train": {}, "adapter": {}}).config == spec({"type": "supervised"}).config


def test_a_learning_rate_override_is_answered_as_its_multiplier():
    s = spec({"type": "supervised"}, gemcut={"train": {"lr": 1e-3}})
    assert s.config["train"]["lr"] == 1e-3 and s.hyperparameters["learning_rate_multiplier"] == 5.0


def test_weights_trained_whole_start_from_a_smaller_rate_and_save_less_often():
    s = spec({"type": "supervised"}, gemcut={"adapter.method": "full"})
    assert (s.config["train"]["lr"], s.config["train"]["save_every"]) == (2e-5, 25)


@pytest.mark.parametrize("override, param", [
    ({"data": {"train": ["/etc/passwd"]}}, "extra_body.gemcut.data.train"),
    ({"data.validation": ["x.jsonl"]}, "extra_body.gemcut.data.validation"),
    ({"data": {"test": ["x.jsonl"]}}, "extra_body.gemcut.data.test"),
    ({"data": {"format": "csv"}}, "extra_body.gemcut.data.format"),
    ({"output": {"dir": "/tmp"}}, "extra_body.gemcut.output"),
    ({"output.name": "x"}, "extra_body.gemcut.output.name"),
    ({"model": {"name": "/root/model"}}, "extra_body.gemcut.model.name"),
    ({"model.revision": "main"}, "extra_body.gemcut.model.revision"),
    ({"model": {"trust_remote_code": True}}, "extra_body.gemcut.model.trust_remote_code"),
    ({"objective.rl.reward_model": "/srv/runs/x"}, "extra_body.gemcut.objective.rl.reward_model"),
    ({"objective": {"rl": {"grader": GRADER}}}, "extra_body.gemcut.objective.rl.grader"),
    ({"eval": {"forgetting_data": "/etc/passwd"}}, "extra_body.gemcut.eval.forgetting_data"),
    ({"train.report_to": ["wandb"]}, "extra_body.gemcut.train.report_to"),
])
def test_overrides_that_reach_files_or_code_are_refused_by_name(override, param):
    err = error({"type": "supervised"}, gemcut=override)
    assert err.param == param and param.removeprefix("extra_body.gemcut.") in err.message


@pytest.mark.parametrize("override, param, words", [
    ({"adapter": {"method": "lora", "rank": 8}}, "extra_body.gemcut.adapter.rank", "unknown key 'adapter.rank'"),
    ({"train.lr": "fast"}, "extra_body.gemcut.train.lr", "train.lr"),
    ({"train": {"batch_size": 0}}, "extra_body.gemcut.train.batch_size", "greater than or equal to 1"),
    ({"adapter.method": "full"}, "extra_body.gemcut", "needs adapter.method=lora"),  # dpo's reference is the adapter off
    ({"objective.kind": "dpo"}, "extra_body.gemcut.objective.kind", "use method.type dpo"),
    ({"train": {"": 1}}, "extra_body.gemcut.train.", "empty part"),
])
def test_override_errors_use_the_clis_messages(override, param, words):
    method = {"type": "dpo"} if override == {"adapter.method": "full"} else {"type": "supervised"}
    err = error(method, gemcut=override)
    assert err.param == param and words in err.message


def test_a_hyperparameter_and_its_override_cannot_both_be_given():
    err = error({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}, gemcut={"train": {"epochs": 3}})
    assert err.param == "extra_body.gemcut.train.epochs"
    err = error({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}, gemcut={"train.max_steps": 30})
    assert err.param == "extra_body.gemcut.train.max_steps"
    err = error({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}, gemcut={"objective": {"dpo": {"beta": 0.5}}})
    assert err.param == "extra_body.gemcut.objective.dpo.beta"


# ---------------------------------------------------------------- every other JobSpecError


@pytest.mark.parametrize("method, request_fields, param", [
    ({"type": "finetune"}, {}, "method.type"),
    ({}, {}, "method.type"),
    ("supervised", {}, "method"),
    ({"type": "supervised", "dpo": {}}, {}, "method.dpo"),
    ({"type": "supervised", "extra": 1}, {}, "method.extra"),
    ({"type": "supervised", "supervised": []}, {}, "method.supervised"),
    ({"type": "supervised", "supervised": {"grader": GRADER}}, {}, "method.supervised.grader"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}, {}, "method.supervised.hyperparameters.beta"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}, {}, "method.supervised.hyperparameters.n_epochs"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "3"}}}, {}, "method.supervised.hyperparameters.n_epochs"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2.5}}}, {}, "method.supervised.hyperparameters.batch_size"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"batch_size": True}}}, {}, "method.supervised.hyperparameters.batch_size"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": -1}}}, {},
     "method.supervised.hyperparameters.learning_rate_multiplier"),
    ({"type": "supervised", "supervised": {"hyperparameters": []}}, {}, "method.supervised.hyperparameters"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": float("inf")}}}, {}, "method.dpo.hyperparameters.beta"),
    ({"type": "dpo"}, {"hyperparameters": {"n_epochs": 2}}, "hyperparameters"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}, {"hyperparameters": {"n_epochs": 2}}, "hyperparameters"),
    (rl({"reasoning_effort": "high"}), {}, "method.reinforcement.hyperparameters.reasoning_effort"),
    (rl({"compute_multiplier": 0}), {}, "method.reinforcement.hyperparameters.compute_multiplier"),
    (rl(grader=None), {}, "method.reinforcement.grader"),
    (rl(grader={**GRADER, "operation": "contains"}), {}, "method.reinforcement.grader.operation"),
    (rl(grader={**GRADER, "type": "python"}), {}, "method.reinforcement.grader.type"),
    (rl(grader={**GRADER, "reference": "{{answer}}"}), {}, "method.reinforcement.grader.reference"),
    ({"type": "supervised"}, {"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
    ({"type": "supervised"}, {"seed": -1}, "seed"),
    ({"type": "supervised"}, {"seed": True}, "seed"),
    ({"type": "supervised"}, {"seed": "1"}, "seed"),
    ({"type": "supervised"}, {"suffix": "has:colon"}, "suffix"),
    ({"type": "supervised"}, {"suffix": "x" * 65}, "suffix"),
    ({"type": "supervised"}, {"suffix": 3}, "suffix"),
    ({"type": "supervised"}, {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"type": "supervised"}, {"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"type": "supervised"}, {"metadata": {"k": "v" * 513}}, "metadata"),
    ({"type": "supervised"}, {"metadata": {"k": 1}}, "metadata"),
    ({"type": "supervised"}, {"metadata": ["k"]}, "metadata"),
    ({"type": "supervised"}, {"gemcut": ["train.lr=1"]}, "extra_body.gemcut"),
    ({"type": "supervised"}, {"learning_rate": 0.1}, "learning_rate"),
])
def test_each_error_names_the_field_to_fix(method, request_fields, param):
    err = error(method, kind="messages", **request_fields)
    assert err.param == param, err.message
    assert err.message and str(err) == err.message


@pytest.mark.parametrize("method, kind, counts, needs", [
    ({"type": "dpo"}, "messages", None, "preference"),
    ({"type": "supervised"}, "preference", None, "method.type dpo"),
    (rl(), "preference", None, "method.type dpo"),
    ({"type": "supervised"}, "messages", {"item_fields": ["answer"]}, "answer"),
    ({"type": "dpo"}, "preference", {"item_fields": ["answer"]}, "answer"),
    ({"type": "supervised"}, "messages", {"without_reply": 3}, "3 conversations"),
])
def test_a_file_the_method_cannot_train_on_names_training_file(method, kind, counts, needs):
    err = error(method, kind=kind, counts=counts)
    assert err.param == "training_file" and needs in err.message


@pytest.mark.parametrize("method, validation_kind, counts, words", [
    ({"type": "supervised"}, "preference", None, "validation_file holds preference records, but training_file holds messages"),
    ({"type": "supervised"}, "messages", {"without_reply": 2}, "2 conversations"),
    ({"type": "dpo"}, "messages", None, "validation_file holds messages records"),
])
def test_a_validation_file_of_another_kind_names_validation_file(method, validation_kind, counts, words):
    body = {"model": "m", "training_file": "file-a", "validation_file": "file-b", "method": method}
    with pytest.raises(JobSpecError) as info:
        job_spec(body, base_model_source="m", training_kind=KIND_OF[method["type"]], validation=True, seed_default=0,
                 validation_kind=validation_kind, validation_counts=counts)
    assert info.value.param == "validation_file" and words in info.value.message


def test_a_validation_file_of_the_training_kind_is_accepted():
    body = {"model": "m", "training_file": "file-a", "validation_file": "file-b", "method": rl()}
    s = job_spec(body, base_model_source="m", training_kind="messages", validation=True, seed_default=0,
                 validation_kind="messages", validation_counts={"item_fields": ["answer"], "without_reply": 4})
    assert s.config["train"]["eval_every"] == 20


def test_a_request_that_is_not_an_object():
    with pytest.raises(JobSpecError) as info:
        job_spec(["model"], base_model_source="m", training_kind="messages", validation=False, seed_default=0)
    assert info.value.param is None


# ---------------------------------------------------------------- upload -> job config -> a run


PROMPTS = [f"{line} ({i})" for i, line in enumerate(CORPUS * 3)]
RUNS = {
    "supervised": ({"type": "supervised"}, {}, "causal_lm",
                   [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "ok"}]} for p in PROMPTS]),
    "label-generative": ({"type": "supervised"}, {}, "causal_lm",
                         [{"text": p, "label": ("yes", "no")[i % 2]} for i, p in enumerate(PROMPTS)]),
    "label-classify": ({"type": "supervised"}, {"objective.kind": "classify"}, "classify",
                       [{"text": p, "label": ("yes", "no")[i % 2]} for i, p in enumerate(PROMPTS)]),
    "dpo": ({"type": "dpo"}, {}, "dpo",
            [{"input": {"messages": [{"role": "user", "content": p}]}, "preferred_output": [{"role": "assistant", "content": "yes"}],
              "non_preferred_output": [{"role": "assistant", "content": "no"}]} for p in PROMPTS]),
    "reinforcement": (rl(grader={**GRADER, "operation": "like"}), {"objective.rl.max_new_tokens": 4}, "grpo",
                      [{"messages": [{"role": "user", "content": p}], "answer": "the"} for p in PROMPTS]),
}
QUICK = {"train": {"max_steps": 2, "sample_prompts": 0, "num_threads": 1}, "data.max_length": 256, "adapter": {"r": 4, "alpha": 8}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.mark.parametrize("case", list(RUNS))
def test_each_methods_config_trains_on_a_checked_upload(tmp_path, tiny_model, case):
    from gemcut.train.run import train

    method, overrides, task, rows = RUNS[case]
    upload = tmp_path / "file-uploaded123"  # stored as the service stores it: no suffix
    upload.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    check = validate_upload(upload, f"{case}.jsonl", purpose="fine-tune")
    assert check.status == "processed", check.status_details
    body = {"model": "tiny", "training_file": "file-x", "method": method, "gemcut": {**QUICK, **overrides}}
    s = job_spec(body, base_model_source=str(tiny_model), training_kind=check.kind, validation=False, seed_default=0,
                 training_counts=check.counts)
    config = {**s.config, "data": {**s.config["data"], "train": [str(upload)]}, "output": {"dir": str(tmp_path), "name": case}}
    run = train(RunConfig.model_validate(config))  # what the worker's `gemcut train job_config.yaml` runs
    manifest = json.loads((run / "manifest.json").read_text())
    assert (manifest["stopped"], manifest["task"], manifest["steps"]) == ("completed", task, 2)
    assert (run / "checkpoints" / "step-2" / "COMPLETE").exists()
