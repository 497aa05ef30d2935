"""A real run exported to GGUF and answering through llama.cpp, beside the transformers path (docs/benchmarks.md).

    . .venv/bin/activate && python bench/export_gguf.py runs/h5-gguf-demo --quantize f16 q8_0 --threads 1

For each type: `gemcut export RUN --format gguf --quantize T` (timed), the file size, then chat prompts from
the chatterbot corpus rendered with the run's template answered greedily (EOS ignored, --tokens each) by
llama.cpp (llama-cpp-python) and by the merged float32 model in transformers on the same thread count:
decode tokens/s of each, how many of llama.cpp's greedy tokens equal transformers' (the common prefix of
each answer), and how many answers are identical up to the end-of-turn token. Prompts are the run's
data.instruction applied to a few tweets for label runs (the quickstart), else chat questions. Prints a
JSON summary and the first answers as text.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

QUESTIONS = ["What is AI?", "Tell me a joke.", "What is your favorite color?", "Do you like music?",
             "Who are you?", "What is the meaning of life?", "Can you help me?", "What is a computer?"]
# For runs that put each text into an instruction (data.instruction, e.g. the quickstart's tweets).
TEXTS = ["I love this new phone, the camera is amazing!", "Worst customer service ever, still waiting on hold.",
         "The meeting is moved to 3pm tomorrow.", "Can't believe how good the concert was last night",
         "My flight got cancelled again. Great.", "Just had lunch, going back to work now.",
         "This update broke everything on my laptop", "Happy birthday to my best friend!"]


def transformers_answers(model, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], float]:
    """Greedy answers with the KV cache (what `generate` does), EOS ignored; returns answers and decode tokens/s."""
    answers, decode_s = [], 0.0
    with torch.no_grad():
        for ids in prompts:
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            past, nxt, answer = out.past_key_values, int(out.logits[0, -1].argmax()), []
            start = time.perf_counter()
            for _ in range(tokens):
                answer.append(nxt)
                out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            decode_s += time.perf_counter() - start
            answers.append(answer)
    return answers, len(prompts) * tokens / decode_s


def llama_cpp_answers(gguf: Path, prompts: list[list[int]], tokens: int, threads: int) -> tuple[list[list[int]], float]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    answers, decode_s = [], 0.0
    for ids in prompts:
        answer, start = [], None
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if start is None:
                start = time.perf_counter()  # the first token comes with the prompt's evaluation
            answer.append(int(token))
            if len(answer) == tokens + 1:
                break
        decode_s += time.perf_counter() - start
        answers.append(answer[:tokens])
    return answers, len(prompts) * tokens / decode_s


def llama_cpp_chat(gguf: Path, template, question: str) -> dict:
    """One chat completion through llama-cpp-python's own chat handling: the template and stop come from the file."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, verbose=False)
    messages = ([{"role": "system", "content": template.system_prompt}] if template.system_prompt else []) + \
        [{"role": "user", "content": question}]
    reply = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=64)
    choice = reply["choices"][0]
    return {"question": question, "answer": choice["message"]["content"], "finish_reason": choice["finish_reason"]}


def until(answer: list[int], stops: set[int]) -> list[int]:
    """The answer up to its first end-of-turn token (what a chat client shows)."""
    return answer[:next((i for i, t in enumerate(answer) if t in stops), len(answer))]


def agreement(got: list[list[int]], want: list[list[int]]) -> float:
    same = total = 0
    for a, b in zip(got, want):
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        same, total = same + prefix, total + len(b)
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--quantize", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gemcut_gguf_bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gemcut.export.gguf_export import export_gguf
    from gemcut.export.merge import export_run
    from gemcut.models.load import load_run

    loaded = load_run(args.run)
    data = loaded.config.get("data") or {}
    labels = ", ".join(data.get("labels") or [])
    questions = ([data["instruction"].format(text=t, labels=labels) for t in TEXTS] if data.get("kind") == "label"
                 else QUESTIONS)
    prompts = [loaded.template.prompt_ids([{"role": "user", "content": q}]) for q in questions]
    stops = set(loaded.template.stop_token_ids)
    merged = loaded.model.merge_and_unload().float().eval()
    shutil.rmtree(args.out, ignore_errors=True)
    merged_dir = export_run(args.run, args.out / "merged-fp32", report=False)
    reference, hf_speed = transformers_answers(merged, prompts, args.tokens)
    result = {"run": str(args.run), "threads": args.threads, "tokens_per_answer": args.tokens, "prompts": len(prompts),
              "transformers_fp32": {"bytes": (merged_dir / "model.safetensors").stat().st_size,
                                    "decode_tokens_per_s": round(hf_speed, 1)}}
    texts = {"transformers": loaded.tokenizer.decode(reference[0])}
    for quantize in args.quantize:
        start = time.perf_counter()
        folder = export_gguf(args.run, args.out / f"gguf-{quantize}", quantize=quantize)
        seconds = time.perf_counter() - start
        answers, speed = llama_cpp_answers(folder / "model.gguf", prompts, args.tokens, args.threads)
        result[f"llama_cpp_{quantize}"] = {"bytes": (folder / "model.gguf").stat().st_size, "export_s": round(seconds, 1),
                                           "decode_tokens_per_s": round(speed, 1),
                                           "greedy_agreement": round(agreement(answers, reference), 3),
                                           "answers_identical": sum(until(a, stops) == until(b, stops)
                                                                    for a, b in zip(answers, reference))}
        texts[quantize] = loaded.tokenizer.decode(answers[0])
        result[f"llama_cpp_{quantize}"]["chat"] = llama_cpp_chat(folder / "model.gguf", loaded.template, questions[0])
    print(json.dumps(result, indent=2))
    print(f"Q: {questions[0]!r}")
    for name, text in texts.items():
        print(f"  {name}: {text!r}")


if __name__ == "__main__":
    main()
