"""The Ollama Modelfile of a GGUF export: its Go template renders conversations to exactly the run's tokens.

    python -m pytest -q tests/test_export_ollama.py

Ollama is not installed here: gemcut/export/go_template.py renders the Go template subset gemcut writes, and
its own rules are pinned below against Go's documented behaviour.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from serve_runs import lora_run, plain_model
from tiny import tiny_tokenizer

from gemcut.data.templates import ChatTemplate
from gemcut.export.gguf_export import export_gguf
from gemcut.export.go_template import render_go_template
from gemcut.export.ollama import ModelfileError, modelfile_text, ollama_messages, read_modelfile_template, translate

# SmolLM2-Instruct's own template: a default system prompt when the conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "what is the capital of france?"}],
    [{"role": "system", "content": "answer the question briefly."}, {"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "be kind"}, {"role": "user", "content": "i love this product"},
     {"role": "assistant", "content": "it is great and wonderful!"}, {"role": "user", "content": "the weather?\nokay"}],
    [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": "jumps"},
     {"role": "user", "content": "over the lazy dog"}],
]


def ollama_ids(template: ChatTemplate, go_source: str, messages: list[dict]) -> list[int]:
    """What Ollama would feed the model: SYSTEM first when the chat has no system message, then the template."""
    if template.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": template.system_prompt}, *messages]
    text = render_go_template(go_source, ollama_messages(messages))
    return template.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ollama")
    return lora_run(tmp / "run", plain_model(tmp / "base"), seed=1)


def test_modelfile_beside_the_gguf_renders_the_runs_tokens(run, tmp_path):
    out = export_gguf(run, tmp_path / "gguf", quantize="q8_0")
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER num_ctx 256" in modelfile
    assert "PARAMETER temperature" in modelfile
    template = ChatTemplate.load(run / "final")
    go_source = read_modelfile_template(out / "Modelfile")
    for messages in CONVERSATIONS:
        assert ollama_ids(template, go_source, messages) == template.prompt_ids(messages), messages
    assert json.loads((out / "export.json").read_text())["modelfile"] == "Modelfile"


def test_default_system_prompt_and_run_system_prompt():
    tok = tiny_tokenizer()
    for system_prompt in (None, "you answer in one line."):
        template = ChatTemplate(tok, SMOLLM2_TEMPLATE, system_prompt=system_prompt)
        text = modelfile_text(template, "model.gguf", parameters={})
        assert ('SYSTEM """you answer in one line."""' in text) == bool(system_prompt)
        go_source = translate(template)
        assert "You are a helpful AI assistant named SmolLM" in go_source  # only when no system message comes
        for messages in CONVERSATIONS:
            assert ollama_ids(template, go_source, messages) == template.prompt_ids(messages), (system_prompt, messages)


def test_final_assistant_message_stays_open_for_ollama_to_continue():
    template = ChatTemplate.from_tokenizer(tiny_tokenizer())
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = render_go_template(translate(template), ollama_messages(messages))
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello"


def test_a_template_without_exact_translation_is_refused_and_the_gguf_still_written(run, tmp_path):
    upper = ChatTemplate(tiny_tokenizer(), SMOLLM2_TEMPLATE.replace("message['content']", "message['content'] | upper"))
    with pytest.raises(ModelfileError, match="verbatim"):
        translate(upper)
    # The run's own template replaced on disk: the export writes the GGUF and says why there is no Modelfile.
    final = run.parent / "run-upper"
    shutil.copytree(run, final)
    (final / "final" / "chat_template.jinja").write_text(upper.source)
    out = export_gguf(final, tmp_path / "gguf-upper")
    info = json.loads((out / "export.json").read_text())
    assert (out / "model.gguf").is_file() and not (out / "Modelfile").exists()
    assert "verbatim" in info["modelfile_error"]


def test_go_template_subset_follows_go():
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}], "Name": "x"}
    src = ("{{- range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}[{{ $i }}:{{ .Role }}"
           "{{ if $last }} last{{ else if eq .Role \"user\" }} first{{ else }} other{{ end }}]{{ end }}")
    assert render_go_template(src, data) == "[0:user first][1:assistant last]"
    assert render_go_template("a  {{- .Name -}}  \n b", data) == "axb"  # trim markers eat surrounding spaces
    assert render_go_template('{{ (index .Messages 1).Content }}{{ if and .Name (ne .Name "y") }}!{{ end }}', data) == "b!"
    assert render_go_template('{{ if or (not .Name) (eq .Name "z" "x") }}yes{{ end }}', data) == "yes"
    assert render_go_template('{{ "{{" }}', data) == "{{"
    with pytest.raises(ValueError):
        render_go_template("{{ printf \"%s\" .Name }}", data)
