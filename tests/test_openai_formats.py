"""OpenAI's chat fine-tuning JSONL: names, tool calls, tool results, a tools list, text parts, weight 0/1.

    python -m pytest -q tests/test_openai_formats.py

Format: https://platform.openai.com/docs/guides/supervised-fine-tuning (chat records with `tools`,
assistant `tool_calls` whose `arguments` is a JSON string, `tool` messages with `tool_call_id`, content as a
list of text parts, assistant `weight` 0 or 1). The tools template below is Qwen2.5-Instruct's tool handling
(tools as JSON in the system header, calls in <tool_call>, results in a user turn of <tool_response>s), with
the message's `name` added to the role header so that names are seen to reach the template.
"""

from __future__ import annotations

import copy
import json

import pytest
from tiny import tiny_tokenizer

from gemcut.config import DataConfig
from gemcut.data.collate import IGNORE
from gemcut.data.normalize import Normalizer
from gemcut.data.prepare import prepare
from gemcut.data.readers import Row
from gemcut.data.templates import ChatTemplate
from gemcut.data.tokenize import tokenize_records
from gemcut.errors import DataError
from gemcut.tasks import TASKS

TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- set header = message.role + (' ' + message.name if message.name else '') %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + header + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + header }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "paris"}'}}
CHAT = {
    "messages": [
        {"role": "system", "content": "answer the question briefly."},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "what is "}, {"type": "text", "text": "the weather?"}]},
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "the weather is okay today."},
        {"role": "user", "content": "and tomorrow?"},
        {"role": "assistant", "content": "nothing special.", "weight": 0},
    ],
    "tools": TOOLS,
}
NORMALIZED = {
    "messages": [
        {"role": "system", "content": "answer the question briefly."},
        {"role": "user", "content": "what is the weather?", "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "the weather is okay today."},
        {"role": "user", "content": "and tomorrow?"},
        {"role": "assistant", "content": "nothing special.", "weight": 0},
    ],
    "tools": TOOLS,
}


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.name_or_path = "tiny-chatml"
    return t


@pytest.fixture(scope="module")
def tools_tmpl(tok):
    t = tiny_tokenizer()
    t.chat_template = TOOLS_TEMPLATE
    return ChatTemplate.from_tokenizer(t)


def normalize(value, kind="auto"):
    return Normalizer(kind).normalize(Row("chat.jsonl", 1, value))[0]


def trained_runs(tok, ids, labels) -> list[str]:
    """The decoded text of each run of consecutive trained tokens: the exact loss mask, readably."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


# ---------------------------------------------------------------- reading


def test_an_openai_chat_record_is_read_whole():
    assert normalize(copy.deepcopy(CHAT)) == [{**NORMALIZED, "_source": "chat.jsonl:1"}]


def test_prepare_keeps_tool_call_turns_and_their_tools(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT) + "\n", encoding="utf-8")
    prepared = prepare(DataConfig(train=[str(path)], split={"validation": 0, "test": 0}))
    assert prepared.kind == "messages"
    [rec] = prepared.splits["train"]
    assert {k: v for k, v in rec.items() if k != "_source"} == NORMALIZED
    assert prepared.report["cleaning"]["dropped"] == {}


def _with(i: int, **fields) -> dict:
    """CHAT with message i changed (a field set to None is removed)."""
    value = copy.deepcopy(CHAT)
    for k, v in fields.items():
        if v is None:
            value["messages"][i].pop(k, None)
        else:
            value["messages"][i][k] = v
    return value


BAD = [
    # (id, record, field, reason, message after "chat.jsonl:1: ")
    ("image_part", _with(1, content=[{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]),
     "messages[1].content[1]", "wrong_type",
     'messages[1].content[1] is a "image_url" part; only text parts ({"type": "text", "text": ...}) are supported, '
     "so write what it shows as text or remove the part"),
    ("empty_parts", _with(1, content=[]), "messages[1].content", "empty_text",
     "messages[1].content is an empty list of parts; give it at least one text part"),
    ("weight_half", _with(4, weight=0.5), "messages[4].weight", "wrong_type",
     "messages[4].weight must be 0 or 1 (0 leaves the turn out of the loss), got 0.5"),
    ("weight_on_user", _with(1, weight=1), "messages[1].weight", "wrong_type",
     "messages[1].weight is only meaningful on assistant messages (role is user)"),
    ("arguments_not_json", _with(2, tool_calls=[{**CALL, "function": {"name": "get_weather", "arguments": "{city: paris}"}}]),
     "messages[2].tool_calls[0].function.arguments", "wrong_type",
     "messages[2].tool_calls[0].function.arguments is not valid JSON (Expecting property name enclosed in double quotes "
     'at column 2); write the arguments as a JSON object inside a string, e.g. "{\\"city\\": \\"paris\\"}"'),
    ("arguments_a_dict", _with(2, tool_calls=[{**CALL, "function": {"name": "get_weather", "arguments": {"city": "paris"}}}]),
     "messages[2].tool_calls[0].function.arguments", "wrong_type",
     "messages[2].tool_calls[0].function.arguments must be a string holding a JSON object (OpenAI's format), got dict "
     "({'city': 'paris'}); write it as json.dumps(arguments)"),
    ("arguments_a_list", _with(2, tool_calls=[{**CALL, "function": {"name": "get_weather", "arguments": "[1, 2]"}}]),
     "messages[2].tool_calls[0].function.arguments", "wrong_type",
     "messages[2].tool_calls[0].function.arguments must encode a JSON object ({...}), got list"),
    ("type_not_function", _with(2, tool_calls=[{**CALL, "type": "code"}]), "messages[2].tool_calls[0].type", "wrong_type",
     "messages[2].tool_calls[0].type must be \"function\", got 'code'"),
    ("call_without_id", _with(2, tool_calls=[{k: v for k, v in CALL.items() if k != "id"}]), "messages[2].tool_calls[0].id",
     "missing_field", "messages[2].tool_calls[0].id missing; give each call an id, which its tool result repeats as tool_call_id"),
    ("unknown_function", _with(2, tool_calls=[{**CALL, "function": {"name": "get_wether", "arguments": "{}"}}]),
     "messages[2].tool_calls[0].function.name", "tool_call_mismatch",
     'messages[2].tool_calls[0].function.name "get_wether" is not one of the record\'s tools (get_weather); '
     'did you mean "get_weather"?'),
    ("calls_on_user", _with(1, tool_calls=[CALL]), "messages[1].tool_calls", "wrong_type",
     "messages[1].tool_calls: only assistant messages make tool calls (role is user)"),
    ("result_without_id", _with(3, tool_call_id=None), "messages[3].tool_call_id", "missing_field",
     "messages[3].tool_call_id missing; a tool result names the call it answers (here call_1)"),
    ("result_for_no_call", _with(3, tool_call_id="call_9"), "messages[3].tool_call_id", "tool_call_mismatch",
     'messages[3].tool_call_id "call_9" answers no call of messages[2] (call_1)'),
    ("call_unanswered", _with(3, role="user", tool_call_id=None), "messages[3].role", "tool_call_mismatch",
     'messages[3] is "user" but call_1 of messages[2] has no result; add a "tool" message with tool_call_id "call_1" first'),
    ("tool_after_user", _with(2, role="tool", tool_calls=None, tool_call_id="call_1", content="sunny"), "messages[2].role",
     "roles_not_alternating", 'messages[2] is "tool" after "user"; a tool message answers the tool_calls of the assistant '
     "message just before it"),
    ("unknown_message_field", _with(1, tool="x"), "messages[1].tool", "extra_field",
     'messages[1] has unknown field "tool"; a message has role, content and optional name, weight, tool_calls (assistant) '
     "and tool_call_id (tool)"),
    ("tools_not_a_list", {**CHAT, "tools": "get_weather"}, "tools", "wrong_type",
     'field "tools" must be a list of {"type": "function", "function": {"name", "parameters"}} schemas, got str (\'get_weather\')'),
    ("tool_not_a_function", {**CHAT, "tools": [{"type": "retrieval"}]}, "tools[0].type", "wrong_type",
     "tools[0].type must be \"function\", got 'retrieval'"),
    ("tool_without_name", {**CHAT, "tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name",
     "missing_field", "tools[0].function.name missing; name the function the model may call"),
    ("tools_on_a_completion", {"prompt": "what is the weather?", "completion": "sunny.", "tools": TOOLS}, "tools", "extra_field",
     'field "tools" goes with messages records (a conversation whose assistant turns call the tools); this is a '
     "prompt_completion record"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_openai_fields_are_named_with_the_fix(case):
    _, value, field, reason, message = case
    with pytest.raises(DataError) as info:
        normalize(value)
    assert str(info.value) == "chat.jsonl:1: " + message
    assert (info.value.field, info.value.reason) == (field, reason)


def test_weight_one_and_a_final_tool_call_are_fine():
    value = _with(4, weight=1)
    value["messages"] = value["messages"][:5] + [{"role": "user", "content": "and in rome?"},
                                                 {"role": "assistant", "content": None, "tool_calls": [{**CALL, "id": "call_2"}]}]
    rec = normalize(value)[0]
    assert rec["messages"][4]["weight"] == 1 and rec["messages"][-1] == {"role": "assistant", "content": "",
                                                                       "tool_calls": [{**CALL, "id": "call_2"}]}


# ---------------------------------------------------------------- rendering and loss masks


def test_tools_names_and_calls_reach_the_template_and_mask_exactly(tools_tmpl):
    tok = tools_tmpl.tokenizer
    [ex], stats = tokenize_records([{**NORMALIZED, "_source": "chat.jsonl:1"}], "messages", tok, tools_tmpl, DataConfig(), TASKS["causal_lm"])
    # The ids are transformers' own render, given the tools and the calls with their arguments as objects.
    as_hf = copy.deepcopy(NORMALIZED["messages"])
    as_hf[2]["tool_calls"][0]["function"]["arguments"] = {"city": "paris"}
    assert ex["input_ids"] == tok.apply_chat_template(as_hf, tools=TOOLS, return_dict=False)
    text = tok.decode(ex["input_ids"])
    assert '"name": "get_weather"' in text and "<|im_start|>user ann\nwhat is the weather?" in text
    # Trained: the tool-call turn and the weight-1 reply, each with its <|im_end|>. Not trained: system, tools,
    # user turns, the tool result, and the weight-0 reply.
    assert trained_runs(tok, ex["input_ids"], ex["labels"]) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call><|im_end|>',
        "the weather is okay today.<|im_end|>",
    ]
    assert stats["loss_tokens"] == sum(lab != IGNORE for lab in ex["labels"])


def test_weight_zero_on_a_tool_call_turn_leaves_it_out(tools_tmpl):
    rec = copy.deepcopy(NORMALIZED)
    rec["messages"][2]["weight"] = 0
    [ex], _ = tokenize_records([rec], "messages", tools_tmpl.tokenizer, tools_tmpl, DataConfig(), TASKS["causal_lm"])
    assert trained_runs(tools_tmpl.tokenizer, ex["input_ids"], ex["labels"]) == ["the weather is okay today.<|im_end|>"]


def test_plain_chat_mask_with_names_and_text_parts_on_chatml(tok):
    rec = normalize({"messages": [
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": "paris is the capital of france.", "weight": 1},
        {"role": "user", "content": "and the weather?"},
        {"role": "assistant", "content": "okay.", "weight": 0}]})[0]
    [ex], _ = tokenize_records([rec], "messages", tok, ChatTemplate.from_tokenizer(tok), DataConfig(), TASKS["causal_lm"])
    assert ex["input_ids"] == tok.apply_chat_template(rec["messages"], return_dict=False)
    assert trained_runs(tok, ex["input_ids"], ex["labels"]) == ["paris is the capital of france.<|im_end|>"]
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>user\nhello world<|im_end|>")


FIX = ("use a model whose chat template renders tools and tool calls (e.g. Qwen2.5-Instruct or Llama 3.1 Instruct), "
       "or remove tools and tool_calls from the data")


def test_a_template_without_tools_is_an_error_naming_it(tok):
    chatml = ChatTemplate.from_tokenizer(tok)
    with pytest.raises(DataError) as info:
        tokenize_records([{**NORMALIZED, "_source": "chat.jsonl:3"}], "messages", tok, chatml, DataConfig(), TASKS["causal_lm"])
    assert str(info.value) == ("chat.jsonl:3: the chat template of 'tiny-chatml' does not render tools (its text is the "
                               "same with and without the record's tools), so the model would never see them; " + FIX)
    assert (info.value.field, info.value.reason) == ("tools", "template_without_tools")

    no_tools = {"messages": NORMALIZED["messages"], "_source": "chat.jsonl:4"}
    named = ChatTemplate.from_tokenizer(tok, "chatml")
    with pytest.raises(DataError) as info:
        tokenize_records([no_tools], "messages", tok, named, DataConfig(), TASKS["causal_lm"])
    assert str(info.value) == ("chat.jsonl:4: data.template=chatml does not render tool_calls (messages[2].tool_calls is "
                               "missing from its text), so the model would never see them; " + FIX)
    assert info.value.field == "messages[2].tool_calls"
