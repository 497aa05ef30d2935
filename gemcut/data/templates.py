"""Chat templates: render `messages` into token ids and a per-token loss weight.

    python -m pytest -q tests/test_templates.py

A `ChatTemplate` is the model's own Jinja chat template (`tokenizer.chat_template`) or a named one for base
models without one (`chatml`, `alpaca`, `plain`; config `data.template`). The same object renders training
examples, evaluation prompts and serving prompts, and is saved into the run (`chat_template.jinja` +
`template.json`), so all three see identical text.

Tools (OpenAI's chat format): a conversation's `tools` (function schemas) go to the template's `tools`
argument, and assistant `tool_calls` reach it with their JSON-string `arguments` parsed into objects (what
transformers' tool-use templates expect). A template that renders neither is found by rendering with and
without them (the first time a conversation has them): when the tool content is missing from its text, the
conversation is refused with an error naming the template, instead of training on a conversation the model
never sees.

How the loss weights are found, exactly: the whole conversation is rendered to one string by the template
and tokenized once (so the ids equal `tokenizer.apply_chat_template(messages)`'s, with no merge differences
at segment boundaries). The character span of each assistant message's content is located by prefix
diffing: the render of the messages before it, with the generation prompt, is a prefix of the full render
for prefix-stable templates (ChatML, Llama 3, ...), and the content starts right after it. Tokens that
overlap an assistant span carry that message's `weight` (default 1), and so does the end-of-turn token that
follows the content (`<|im_end|>`, EOS), because the model must learn to stop. An assistant turn with
`tool_calls` has no verbatim content to find: its span runs from the generation prompt to the end of its own
render (the calls as the template writes them, and its end-of-turn token). Everything else — system and user
text, tool results, role headers, separators — carries weight 0 (or 1 with `train_on="all"`).
"""

from __future__ import annotations

import json
from bisect import bisect_right
from pathlib import Path
from typing import Any

from gemcut.errors import ConfigError, DataError

# Templates for base models that have none. They use the tokenizer's eos_token to end an assistant turn, so
# the model learns to stop; `eos_token` is passed to the template by transformers from the tokenizer.
NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "plain": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\n' }}"
        "{% else %}{{ message['content'] + '\n' }}{% endif %}"
        "{% endfor %}"
    ),
}

TEMPLATE_JSON = "template.json"
TEMPLATE_JINJA = "chat_template.jinja"

Span = tuple[int, int, float]  # [start, end) in characters of the rendered text, weight


class ChatTemplate:
    """Renders conversations for one tokenizer; see the module docstring for how weights are assigned.

    `name` is "tokenizer" for the model's own template or one of NAMED_TEMPLATES; `system_prompt` (config
    `data.system_prompt`) is prepended to conversations that have no system message.
    """

    def __init__(self, tokenizer, source: str, name: str = "tokenizer", system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.source = source
        self.name = name
        self.system_prompt = system_prompt
        eot = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        # Special tokens that end a turn (<|im_end|>, <|eot_id|>, <end_of_turn>, </s>) learn to stop too; other
        # special tokens (<|im_start|>, <pad>) never carry loss.
        for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            text = str(getattr(added, "content", added)).lower()
            if getattr(added, "special", False) and ("end" in text or "eot" in text or "</" in text):
                eot.add(int(token_id))
        self._end_ids = eot
        self._renders_tools: set[str] = set()  # "tools", "tool_calls": shown to render once, not probed again

    @property
    def label(self) -> str:
        """How errors name this template: the model's own, or `data.template=NAME`."""
        if self.name != "tokenizer":
            return f"data.template={self.name}"
        model = getattr(self.tokenizer, "name_or_path", "") or "this model"
        return f"the chat template of {model!r}"

    # ------------------------------------------------------------ construction

    @classmethod
    def from_tokenizer(cls, tokenizer, name: str | None = None, system_prompt: str | None = None) -> ChatTemplate:
        """The tokenizer's own template (name None) or a named one; a clear error when neither exists."""
        if name is None:
            source = getattr(tokenizer, "chat_template", None)
            if isinstance(source, dict):  # several named templates: the default one renders conversations
                source = source.get("default")
            if not source:
                raise ConfigError(
                    f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat template, "
                    f"so messages cannot be rendered; set data.template to one of {', '.join(NAMED_TEMPLATES)} "
                    "(e.g. data.template=chatml)"
                )
            return cls(tokenizer, source, "tokenizer", system_prompt)
        if name not in NAMED_TEMPLATES:
            raise ConfigError(f"data.template={name!r} is not a known template; use one of {', '.join(NAMED_TEMPLATES)} or leave it unset")
        if tokenizer.eos_token is None:
            raise ConfigError(f"data.template={name} ends assistant turns with the EOS token, but the tokenizer has none")
        return cls(tokenizer, NAMED_TEMPLATES[name], name, system_prompt)

    def save(self, directory: str | Path) -> None:
        """Write `chat_template.jinja` and `template.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TEMPLATE_JINJA).write_text(self.source, encoding="utf-8")
        meta = {"name": self.name, "system_prompt": self.system_prompt, "file": TEMPLATE_JINJA,
                "end_of_turn_ids": sorted(self._end_ids)}
        (directory / TEMPLATE_JSON).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path, tokenizer=None) -> ChatTemplate:
        """Read a saved template; the tokenizer defaults to the one saved in the same folder."""
        directory = Path(directory)
        meta_path = directory / TEMPLATE_JSON
        if not meta_path.is_file():
            raise ConfigError(f"{directory}: no {TEMPLATE_JSON}; this folder was not written by gemcut's save_final")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        source = (directory / meta.get("file", TEMPLATE_JINJA)).read_text(encoding="utf-8")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
        return cls(tokenizer, source, meta.get("name", "tokenizer"), meta.get("system_prompt"))

    # ------------------------------------------------------------ rendering

    def with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and (not messages or messages[0].get("role") != "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return list(messages)

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        """The template's text for `messages` (system prompt added), as the model sees it."""
        return self._render(self.with_system(messages), add_generation_prompt, tools)

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        return self.tokenizer.apply_chat_template(
            _for_template(messages), tools=tools or None, chat_template=self.source, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def _try_render(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str | None:
        try:
            return self._render(messages, add_generation_prompt, tools)
        except Exception:  # templates may reject partial conversations (empty, or role order checks)
            return None

    def _check_renders_tools(self, messages: list[dict], tools: list[dict] | None, text: str, shift: int) -> None:
        """Refuse tools or tool calls that the template drops: rendered without them, the text must differ, and
        rendered with them, it must name each function. `shift` = system messages added before the record's."""
        fix = ("so the model would never see them; use a model whose chat template renders tools and tool calls "
               "(e.g. Qwen2.5-Instruct or Llama 3.1 Instruct), or remove tools and tool_calls from the data")
        if tools and "tools" not in self._renders_tools:
            names = [t.get("function", {}).get("name", "") for t in tools]
            if self._try_render(messages, False, None) == text or not all(n in text for n in names):
                raise DataError(f"{self.label} does not render tools (its text is the same with and without the record's "
                                f"tools), {fix}", field="tools", reason="template_without_tools")
            self._renders_tools.add("tools")
        at = next((i for i, m in enumerate(messages) if m.get("tool_calls")), None)
        if at is not None and "tool_calls" not in self._renders_tools:
            bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
            names = [c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()]
            if self._try_render(bare, False, tools) == text or not all(n in text for n in names):
                where = f"messages[{at - shift}].tool_calls"
                raise DataError(f"{self.label} does not render tool_calls ({where} is missing from its text), {fix}",
                                field=where, reason="template_without_tools")
            self._renders_tools.add("tool_calls")

    def text_and_spans(self, messages: list[dict], add_generation_prompt: bool = False,
                       tools: list[dict] | None = None) -> tuple[str, list[Span]]:
        """Rendered text and the character spans of assistant contents with their weights."""
        given = len(messages)
        messages = self.with_system(messages)
        text = self._render(messages, add_generation_prompt, tools)
        if tools or any(m.get("tool_calls") for m in messages):
            self._check_renders_tools(messages, tools, text if not add_generation_prompt else
                                      self._render(messages, False, tools), len(messages) - given)
        spans: list[Span] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            content = message.get("content") or ""
            weight = float(message.get("weight", 1.0) if message.get("weight") is not None else 1.0)
            start = cursor
            for gen in (True, False):
                prefix = self._try_render(messages[:i], gen, tools)
                if prefix is not None and text.startswith(prefix) and len(prefix) >= cursor:
                    start = len(prefix)
                    break
            if message.get("tool_calls"):
                # The calls are written by the template, not found verbatim: the span is the turn's own render.
                own = self._try_render(messages[: i + 1], False, tools)
                end = len(own.rstrip()) if own is not None and text.startswith(own) else -1
                if end <= start:
                    raise DataError(f"{self.label} does not render assistant message {i - (len(messages) - given)}'s tool calls "
                                    "as a prefix of the whole conversation, so their loss mask cannot be located; use a model "
                                    "whose chat template renders tool calls turn by turn (e.g. Qwen2.5-Instruct)",
                                    field=f"messages[{i - (len(messages) - given)}].tool_calls")
                spans.append((start, end, weight))
                cursor = end
                continue
            at = text.find(content, start) if content else start
            if at < 0 and content.strip():
                content = content.strip()  # templates that trim message content
                at = text.find(content, start)
            if at < 0:
                raise DataError(
                    f"chat template {self.name!r} does not reproduce assistant message {i}'s content verbatim, "
                    "so its loss mask cannot be located; use data.template=chatml (or another named template)",
                    field="messages",
                )
            spans.append((at, at + len(content), weight))
            cursor = at + len(content)
        return text, spans

    def _weights(self, ids: list[int], offsets: list[tuple[int, int]], spans: list[Span], train_on: str) -> list[float]:
        base = 1.0 if train_on == "all" else 0.0
        weights = [base] * len(ids)
        starts = [s for s, _, _ in spans]
        for t, (s, e) in enumerate(offsets):
            # The last span starting before the token's end is the only one it can overlap (spans are ordered).
            k = bisect_right(starts, max(s, e - 1)) - 1
            if k >= 0:
                a, b, w = spans[k]
                if s < b and e > a:
                    weights[t] = w
        # The end-of-turn token right after each assistant content learns to stop.
        ends = iter(sorted((b, w) for _, b, w in spans))
        nxt = next(ends, None)
        for t, (s, _e) in enumerate(offsets):
            while nxt is not None and s >= nxt[0]:
                if ids[t] in self._end_ids:
                    weights[t] = nxt[1]
                nxt = next(ends, None)
        return weights

    def render(self, messages: list[dict], add_generation_prompt: bool = False, train_on: str = "completion",
               tools: list[dict] | None = None) -> tuple[list[int], list[float]]:
        """Token ids and per-token loss weights (0 for prompt tokens and scaffolding).

        `train_on="all"` gives weight 1 to every token except assistant content, which keeps its message weight.
        `tools`: OpenAI function schemas for the template's `tools` argument.
        """
        return self.render_many([messages], add_generation_prompt, train_on, tools=[tools])[0]

    def render_many(self, conversations: list[list[dict]], add_generation_prompt: bool = False,
                    train_on: str = "completion", *, tools: list[list[dict] | None] | None = None,
                    sources: list[str] | None = None) -> list[tuple[list[int], list[float]]]:
        """`render` for many conversations, with one batched tokenizer call (much faster on big sets).

        `tools` holds each conversation's tools (or None); `sources` ("file:line" each) name the record in errors.
        """
        if not conversations:
            return []
        rendered = []
        for k, m in enumerate(conversations):
            try:
                rendered.append(self.text_and_spans(m, add_generation_prompt, tools[k] if tools else None))
            except DataError as e:
                if sources is None or e.path is not None:
                    raise
                raise DataError(str(e), path=sources[k], field=e.field, reason=e.reason) from None
        enc = self.tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
            out.append((list(ids), self._weights(ids, [tuple(o) for o in offsets], spans, train_on)))
        return out

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of `messages` followed by the generation prompt: what a model continues from."""
        return self.render(messages, add_generation_prompt=True, tools=tools)[0]

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn (EOS and special end-of-turn tokens); generation stops on them."""
        return sorted(self._end_ids)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "system_prompt": self.system_prompt, "source": self.source}


def _for_template(messages: list[dict]) -> list[dict]:
    """Messages as transformers' tool-use templates expect them: a tool call's JSON-string `arguments` (OpenAI's
    format, kept in the data) parsed into an object; everything else as it is."""
    if not any(m.get("tool_calls") for m in messages):
        return messages
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [_call_with_object_arguments(c) for c in m["tool_calls"]]}
        out.append(m)
    return out


def _call_with_object_arguments(call: dict) -> dict:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        arguments = json.loads(fn["arguments"])
    except ValueError:
        return call  # left as written: the data checks name bad arguments, this only renders
    return {**call, "function": {**fn, "arguments": arguments}}
