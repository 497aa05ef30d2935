"""An Ollama Modelfile beside a GGUF export: FROM, the run's chat template in Go's template language, stops.

    python -m pytest -q tests/test_export_ollama.py
    ollama create my-run -f runs/my-run/export/gguf-q8_0/Modelfile && ollama run my-run

Ollama formats chats with a Go text/template, not with the Jinja template in the GGUF, so the run's template
is translated. Translation is by rendering, not by parsing Jinja: the run's template renders probe
conversations whose contents are unique markers, and the text around each marker is the wrapper of that
role (`<|im_start|>user\\n` ... `<|im_end|>\\n` for ChatML), the text a generation prompt adds
(`<|im_start|>assistant\\n`), and any text a template puts first when the conversation has no system message
(SmolLM2's default system prompt). The Go template writes those wrappers around `.Content` in a
`range .Messages` loop, leaves a final assistant message open (Ollama continues it), and opens an assistant
turn after a final user message, as Ollama's own templates do. Before a Modelfile is written, the Go
template is rendered (gemcut/export/go_template.py) on test conversations and must give the very text of the
run's template; when it cannot (templates that rewrite contents, or tool calls), `ModelfileError` says why
and the GGUF is exported without a Modelfile. The run's system prompt (`data.system_prompt`) becomes
`SYSTEM`, which Ollama adds as the first message when a chat has none, as gemcut does.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemcut.errors import GemcutError
from gemcut.export.go_template import render_go_template

MARK = {"system": "GemcutSystemMark", "user": "GemcutUserMark", "assistant": "GemcutAssistantMark"}
PROBE = [{"role": "system", "content": MARK["system"] + "0"}, {"role": "user", "content": MARK["user"] + "1"},
         {"role": "assistant", "content": MARK["assistant"] + "2"}, {"role": "user", "content": MARK["user"] + "3"},
         {"role": "assistant", "content": MARK["assistant"] + "4"}]
# Conversations the translation must reproduce exactly before it is written.
CHECKS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"},
     {"role": "user", "content": "d"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}],
]


class ModelfileError(GemcutError):
    """The run's chat template has no exact Go translation; the message says what differs."""


def jinja_render(template, messages: list[dict], add_generation_prompt: bool) -> str:
    """The run's template on `messages` as they are (no system prompt added: Ollama's SYSTEM does that)."""
    return template.tokenizer.apply_chat_template(messages, chat_template=template.source, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)


def go_literal(text: str) -> str:
    if "{{" in text:
        return "{{ " + json.dumps(text) + " }}"  # literal braces would open an action
    return text


def wrapper(segment: str, message: dict) -> tuple[str, str]:
    """(text before, text after) the message's content inside its rendered segment."""
    if segment.count(message["content"]) != 1:
        raise ModelfileError(f"the chat template does not write a {message['role']} message's content verbatim "
                             "(it changes or repeats it), so it has no exact Ollama translation")
    before, after = segment.split(message["content"])
    return before, after


def translate(template) -> str:
    """The Go template (Ollama TEMPLATE) equivalent to the run's ChatTemplate; raises ModelfileError."""
    renders = []
    for k in range(1, len(PROBE) + 1):
        try:
            renders.append(jinja_render(template, PROBE[:k], add_generation_prompt=False))
        except Exception as exc:  # a template that refuses a probe conversation cannot be probed
            raise ModelfileError(f"the chat template refuses a plain system/user/assistant conversation: {exc}") from exc
    roles: dict[str, tuple[str, str]] = {}
    for k, message in enumerate(PROBE):
        previous = renders[k - 1] if k else ""
        if not renders[k].startswith(previous):
            raise ModelfileError("the chat template renders a conversation differently once it grows (not prefix-stable), "
                                 "so it has no message-by-message Ollama translation")
        pair = wrapper(renders[k][len(previous):], message)
        if roles.setdefault(message["role"], pair) != pair and message["role"] != "system":
            raise ModelfileError(f"the chat template wraps {message['role']} messages differently by position")
    generation = jinja_render(template, PROBE[:4], add_generation_prompt=True)[len(renders[3]):]
    alone = jinja_render(template, PROBE[1:2], add_generation_prompt=False)
    user_segment = roles["user"][0] + PROBE[1]["content"] + roles["user"][1]
    if not alone.endswith(user_segment):
        raise ModelfileError("the chat template renders a first user message differently from a later one")
    no_system = alone[: -len(user_segment)]
    lines = []
    if no_system:
        lines.append('{{ if ne (index .Messages 0).Role "system" }}' + go_literal(no_system) + "{{ end }}")
    lines.append("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    branches = []
    for role, (before, after) in roles.items():
        close = f"{{{{ if not $last }}}}{go_literal(after)}{{{{ end }}}}" if role == "assistant" else go_literal(after)
        branches.append(f'if eq .Role "{role}" }}}}{go_literal(before)}{{{{ .Content }}}}{close}')
    lines.append("{{ " + "{{ else ".join(branches) + "{{ end }}")
    lines.append('{{ if and $last (ne .Role "assistant") }}' + go_literal(generation) + "{{ end }}{{ end }}")
    return "".join(lines)


def ollama_messages(messages: list[dict]) -> dict:
    """The value Ollama gives a template: `.Messages` with `.Role` and `.Content`."""
    return {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}


def check_translation(template, go_source: str) -> None:
    """Render CHECKS both ways; ModelfileError names the first conversation whose text differs."""
    for messages in CHECKS:
        expected = jinja_render(template, messages, add_generation_prompt=messages[-1]["role"] != "assistant")
        got = render_go_template(go_source, ollama_messages(messages))
        if got != expected:
            raise ModelfileError(f"the Ollama template renders {messages!r} as {got!r}, the run's template as {expected!r}")


def stop_strings(template) -> list[str]:
    """The text of each end-of-turn token (Ollama stops on strings)."""
    tokenizer = template.tokenizer
    return sorted({tokenizer.convert_ids_to_tokens(i) for i in template.stop_token_ids})


def modelfile_text(template, gguf_name: str, *, parameters: dict, adapter_name: str | None = None) -> str:
    """The Modelfile: FROM ./<gguf>, optional ADAPTER, TEMPLATE, SYSTEM, PARAMETER stop/num_ctx/sampling."""
    go_source = translate(template)
    check_translation(template, go_source)
    lines = [f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    lines.append(f'TEMPLATE """{go_source}"""')
    if template.system_prompt:
        lines.append(f'SYSTEM """{template.system_prompt}"""')
    for stop in stop_strings(template):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    for key, value in parameters.items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def read_modelfile_template(path: str | Path) -> str:
    """The TEMPLATE of a Modelfile gemcut wrote (between the triple quotes)."""
    text = Path(path).read_text(encoding="utf-8")
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    return text[start:text.index('"""', start)]
