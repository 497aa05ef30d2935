"""OpenAI graders as GRPO rewards: each grader and metric by hand, templates, errors, item fields through data.

    python -m pytest -q tests/test_graders.py

The end-to-end tests run the real pipeline: OpenAI reinforcement rows ({"messages": [user turn], extra
fields}) -> `prepare` with data.extra_fields=keep -> `prompt_inputs` -> the rollout source / `gemcut train`,
and check that each completion is graded against its own prompt's row.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny import save_tiny_llama, tiny_llama, tiny_tokenizer

from gemcut.config import AdapterConfig, RunConfig, validate
from gemcut.data.normalize import Normalizer
from gemcut.data.prepare import prepare
from gemcut.data.readers import Row
from gemcut.errors import ConfigError, DataError
from gemcut.models.adapters import apply_adapter
from gemcut.objectives.graders import GraderReward, fill_template, grader_reward, string_check
from gemcut.objectives.reward_functions import load_reward
from gemcut.tasks import task_named
from gemcut.train.distributed import start
from gemcut.train.rollouts import prompt_inputs, rl_training


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def similarity(metric: str, text: str, reference: str) -> float:
    grader = grader_reward({"type": "text_similarity", "name": "s", "input": text, "reference": reference,
                            "evaluation_metric": metric})
    return grader.grade("", None)


# ---------------------------------------------------------------- graders and metrics, by hand


@pytest.mark.parametrize("operation, text, reference, want", [
    ("eq", "Paris", "Paris", 1.0), ("eq", "Paris", "paris", 0.0),
    ("ne", "Paris", "paris", 1.0), ("ne", "Paris", "Paris", 0.0),
    ("like", "The answer is Paris.", "Paris", 1.0), ("like", "The answer is paris.", "Paris", 0.0),
    ("ilike", "The answer is PARIS.", "paris", 1.0), ("ilike", "The answer is Rome.", "paris", 0.0),
])
def test_string_check_operations(operation, text, reference, want):
    assert string_check(text, reference, operation) == want
    grader = grader_reward({"type": "string_check", "name": "x", "input": "{{sample.output_text}}",
                            "reference": "{{item.answer}}", "operation": operation})
    assert grader.grade(text, {"answer": reference}) == want


def test_fuzzy_match_is_twice_the_matched_characters_over_both_lengths():
    assert similarity("fuzzy_match", "abcd", "abce") == pytest.approx(2 * 3 / 8)
    assert similarity("fuzzy_match", "kitten", "sitting") == pytest.approx(2 * 4 / 13)  # itt + n
    assert similarity("fuzzy_match", "same", "same") == 1.0


def test_bleu_is_the_geometric_mean_of_ngram_precisions():
    # 1- to 4-gram precisions 4/5, 3/4, 2/3, 1/2; equal lengths, so no brevity penalty.
    want = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert similarity("bleu", "a b c d e", "a b c d f") == pytest.approx(want, abs=1e-6)
    assert similarity("bleu", "the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)


@pytest.mark.parametrize("metric, want", [
    ("rouge_1", 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)),  # the, cat shared: P 2/3, R 2/4
    ("rouge_2", 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)),  # "the cat" shared: P 1/2, R 1/3
    ("rouge_l", 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)),  # longest common subsequence "the cat"
])
def test_rouge_f_measures(metric, want):
    assert similarity(metric, "the cat sat", "the cat ran away") == pytest.approx(want, abs=1e-6)


def test_the_reward_grades_each_completion_with_its_own_item():
    reward = grader_reward({"type": "string_check", "name": "x", "input": "{{ sample.output_text }}",
                            "reference": "{{item.answer}}", "operation": "eq"})
    got = reward(["p1", "p2", "p3"], ["4", "4", "9"], None, items=[{"answer": "4"}, {"answer": "5"}, {"answer": "9"}])
    assert got.tolist() == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------- templates


def test_templates_fill_nested_fields_list_elements_and_json_values():
    item = {"a": {"b": "deep"}, "xs": ["zero", "one"], "n": 4, "ok": True, "obj": {"k": [1, 2]}}
    text = "{{sample.output_text}}|{{item.a.b}}|{{ item.xs.1 }}|{{item.n}}|{{item.ok}}|{{item.obj}}"
    assert fill_template(text, "out", item) == 'out|deep|one|4|true|{"k": [1, 2]}'


def test_a_missing_field_names_the_row_the_template_and_the_field():
    with pytest.raises(DataError, match=r"rows.jsonl:3: objective.rl.grader.reference reads \{\{item.answr\}\}, "
                                        r"but item has no 'answr' \(its fields: answer\)"):
        fill_template("{{item.answr}}", "", {"answer": "4"}, where="objective.rl.grader.reference", source="rows.jsonl:3")
    with pytest.raises(DataError, match=r"item.a has no 'c'"):
        fill_template("{{item.a.c}}", "", {"a": {"b": 1}})
    with pytest.raises(DataError, match="set data.extra_fields=keep"):
        fill_template("{{item.answer}}", "", None)


def test_check_items_stops_on_the_first_row_without_the_field():
    reward = grader_reward({"type": "string_check", "name": "x", "reference": "{{item.answer}}", "operation": "eq"})
    reward.check_items([{"item": {"answer": "1"}, "source": "a.jsonl:1"}])
    with pytest.raises(DataError, match=r"a.jsonl:2: .*has no 'answer' \(its fields: other\)"):
        reward.check_items([{"item": {"answer": "1"}, "source": "a.jsonl:1"}, {"item": {"other": 2}, "source": "a.jsonl:2"}])


# ---------------------------------------------------------------- config


def grpo(grader: dict, **rl) -> RunConfig:
    return validate({"objective": {"kind": "grpo", "rl": {"grader": grader, **rl}}})


GOOD = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}


@pytest.mark.parametrize("change, message", [
    ({"operation": "equals"}, r"objective.rl.grader.operation: Input should be 'eq', 'ne', 'like' or 'ilike'"),
    ({"type": "multi"}, r"objective.rl.grader.type: .*'multi' is an OpenAI grader type gemcut does not run; use string_check or text_similarity"),
    ({"type": "python"}, r"objective.rl.grader.type: .*use string_check or text_similarity"),
    ({"type": "text_similarity", "operation": None, "evaluation_metric": "cosine"},
     r"objective.rl.grader.evaluation_metric: .*'cosine' is not supported here; use fuzzy_match, bleu, .*rouge_l"),
    ({"reference": "{{sample.output_json.x}}"}, r"objective.rl.grader.reference: .*\{\{sample.output_json.x\}\}.* use \{\{sample.output_text\}\}"),
    ({"input": "{{items.answer}}"}, r"objective.rl.grader.input: .*\{\{items.answer\}\}"),
    ({"refrence": "x"}, r"unknown key 'objective.rl.grader.refrence'; did you mean 'objective.rl.grader.reference'"),
    ({"operation": None}, r"a string_check grader takes operation"),
    ({"evaluation_metric": "bleu"}, r"no evaluation_metric; remove evaluation_metric"),
])
def test_config_errors_name_the_grader_field(change, message):
    grader = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        grpo(grader)


def test_a_grader_and_a_reward_model_are_one_too_many():
    with pytest.raises(ConfigError, match="both reward_model and grader"):
        grpo(GOOD, reward_model="runs/rm")
    cfg = validate({"objective": {"kind": "grpo"}})
    with pytest.raises(ConfigError, match="objective.rl has no reward: set objective.rl.grader"):
        load_reward(cfg.objective.rl)


def test_the_config_grader_becomes_the_reward_and_rl_data_are_prompts():
    cfg = grpo(GOOD)
    assert isinstance(load_reward(cfg.objective.rl), GraderReward)
    assert cfg.data.prompts_only and not validate({}).data.prompts_only
    assert RunConfig.model_validate_json(cfg.model_dump_json()) == cfg  # config.yaml round trip


# ---------------------------------------------------------------- item fields in data


def row(value: dict, line: int = 1) -> Row:
    return Row("rows.jsonl", line, value)


RFT_ROW = {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4", "meta": {"level": 1}}


def test_extra_fields_are_errors_by_default_and_kept_as_the_item_on_request():
    with pytest.raises(DataError, match='unknown field "answer"'):
        Normalizer("auto", prompts_only=True).normalize(row(RFT_ROW))
    records, unused = Normalizer("auto", extra_fields="keep", prompts_only=True).normalize(row(RFT_ROW))
    assert records == [{"messages": [{"role": "user", "content": "2+2?"}], "item": {"answer": "4", "meta": {"level": 1}},
                        "_source": "rows.jsonl:1"}]
    assert unused == set()
    plain, _ = Normalizer("auto", extra_fields="keep").normalize(row({"text": "hi"}))
    assert plain == [{"text": "hi", "_source": "rows.jsonl:1"}]  # no extra field: the record is as it was


def test_a_prompt_ending_with_the_user_turn_needs_prompts_only():
    with pytest.raises(DataError, match="no assistant turn"):
        Normalizer("auto", extra_fields="keep").normalize(row(RFT_ROW))


def write_rows(path, n: int, seed: int = 0) -> list[dict]:
    """OpenAI reinforcement rows: one user turn (distinct random words, so no two rows are near duplicates) and
    extra fields: `answer`, and `tag` equal to it in every other row."""
    rng = random.Random(seed)
    pool = "the quick brown fox jumps over lazy dog hello world paris capital france weather okay today love hate wait".split()
    rows = []
    for i in range(n):
        answer = f"answer-{i}"
        rows.append({"messages": [{"role": "user", "content": " ".join(rng.sample(pool, 6))}], "answer": answer,
                     "tag": answer if i % 2 == 0 else "other", "index": i})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_each_prompt_reaches_the_grader_with_its_own_row(tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", 12)
    cfg = validate({"data": {"train": [str(tmp_path / "rows.jsonl")], "extra_fields": "keep",
                             "split": {"validation": 0.0, "test": 0.0}},
                    "objective": {"kind": "grpo", "rl": {"grader": GOOD, "group_size": 2, "max_new_tokens": 3}},
                    "train": {"batch_size": 6, "max_steps": 1}})
    prepared = prepare(cfg.data, tmp_path / "prepared")
    written = [json.loads(x) for x in (tmp_path / "prepared" / "train.jsonl").read_text().splitlines()]
    assert {r["item"]["index"] for r in written} == set(range(12))  # the items are in the split files (and their hash)
    tok = tiny_tokenizer()
    prompts = prompt_inputs(prepared.splits["train"], tok)
    by_prompt = {r["messages"][0]["content"]: r["answer"] for r in rows}

    class Recording(GraderReward):
        """The grader, noting which prompt each item came with."""

        def __call__(self, prompts, completions, completion_ids=None, items=None):
            self.seen.extend((p, item["answer"]) for p, item in zip(prompts, items))
            return super().__call__(prompts, completions, completion_ids, items=items)

    reward = Recording(cfg.objective.rl.grader)
    reward.seen = []
    torch.manual_seed(0)
    policy = apply_adapter(tiny_llama(tok), AdapterConfig(r=4), "causal_lm")
    source, _, trained = rl_training(task_named("grpo"), cfg, policy, tok, prompts, reward)
    for step in range(2):
        source.step(trained, epoch=0, index=6 * step, step=step + 1, group=start(cfg.train))
    assert len(reward.seen) == 2 * 6 * 2  # two steps of six prompts, two completions each
    assert all(by_prompt[prompt] == answer for prompt, answer in reward.seen)
    assert len({answer for _, answer in reward.seen}) == 12


def test_grpo_run_with_a_string_check_grader_on_item_fields(tmp_path):
    """`gemcut train` path: OpenAI reinforcement rows, a grader comparing two item fields (so each prompt's reward
    is known in advance: 1 where tag == answer), rewards logged per iteration and per sample."""
    from gemcut.train.run import train

    write_rows(tmp_path / "rows.jsonl", 16)
    grader = {"type": "string_check", "name": "tagged", "input": "{{item.tag}}", "reference": "{{item.answer}}", "operation": "eq"}
    cfg = RunConfig.model_validate({
        "data": {"train": [str(tmp_path / "rows.jsonl")], "extra_fields": "keep", "split": {"validation": 0.25, "test": 0.0},
                 "max_length": 32},
        "model": {"name": str(save_tiny_llama(tmp_path / "llama"))},
        "objective": {"kind": "grpo", "rl": {"grader": grader, "group_size": 2, "max_new_tokens": 3}},
        "train": {"max_steps": 2, "batch_size": 4, "num_threads": 1, "report_to": []},
        "eval": {"max_examples": 4}, "output": {"dir": str(tmp_path / "runs"), "name": "rft"}})
    run_dir = train(cfg)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [x for x in lines if "reward_mean" in x]
    assert [x["step"] for x in iterations] == [1, 2]
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    rows = {r["messages"][0]["content"]: r for r in map(json.loads, (tmp_path / "rows.jsonl").read_text().splitlines())}
    assert samples and all(s["reward"] == float(rows[s["prompt"]]["tag"] == rows[s["prompt"]]["answer"]) for s in samples)
    assert {s.get("split") for s in samples} == {None, "validation"}  # training and held-out samples both checked
    # Four prompts an iteration, each with its own reward for both of its completions: a mean in quarters.
    assert all(x["reward_mean"] * 4 == round(x["reward_mean"] * 4) for x in iterations)
    assert all("val_reward_mean" in x for x in lines if x.get("split") == "validation")
