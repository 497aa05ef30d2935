"""The whole fine-tuning flow with the official openai client against `gemcut serve` (docs/service.md).

    GEMCUT_API_KEYS=admin-key gemcut serve --model smollm2-135m-instruct &       # the service, one worker
    gemcut data prepare examples/sft_chatterbot.yaml --out prepared/chatterbot    # chat JSONL to upload
    OPENAI_API_KEY=$(gemcut keys create alice) python examples/service_client.py prepared/chatterbot/train.jsonl

Upload -> wait for the data checks -> create a supervised job (gemcut's own options through extra_body) ->
follow its events -> chat with the fine-tuned model beside its base. Only the base_url differs from code
written for OpenAI's hosted service.
"""

from __future__ import annotations

import sys
import time

from openai import OpenAI

BASE_URL = "http://127.0.0.1:8000/v1"


def main(path: str) -> None:
    client = OpenAI(base_url=BASE_URL)  # the key from $OPENAI_API_KEY
    started = time.time()
    uploaded = client.files.create(file=open(path, "rb"), purpose="fine-tune")
    checked = client.files.wait_for_processing(uploaded.id)
    print(f"{checked.id} {checked.filename}: {checked.status}")
    if checked.status != "processed":
        sys.exit(checked.status_details)

    job = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct", training_file=checked.id, suffix="chatterbot", seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 8, "learning_rate_multiplier": 1.0}}},
        extra_body={"gemcut": {"train": {"max_steps": 30}, "adapter": {"r": 16},
                               "eval": {"max_examples": 40, "forgetting_data": "chitchat", "forgetting_max_examples": 50}}})
    print(f"{job.id}: {job.status}")

    seen: set[str] = set()
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(5)
        job = client.fine_tuning.jobs.retrieve(job.id)
        for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=50).data):
            if event.id not in seen:
                seen.add(event.id)
                print(f"  [{time.time() - started:5.0f} s] {event.message}")
    if job.status != "succeeded":
        sys.exit(f"{job.id} {job.status}: {job.error}")

    print(f"{job.fine_tuned_model}: {job.trained_tokens} tokens trained, results file {job.result_files[0]}")
    for checkpoint in client.fine_tuning.jobs.checkpoints.list(job.id).data:
        print(f"  checkpoint {checkpoint.fine_tuned_model_checkpoint}  train_loss {checkpoint.metrics.train_loss:.3f}")
    question = [{"role": "user", "content": "What is your favorite book?"}]
    for model in (job.model, job.fine_tuned_model):
        answer = client.chat.completions.create(model=model, messages=question, max_tokens=40, temperature=0)
        print(f"{model}:\n  {answer.choices[0].message.content}")
    print(f"all in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1])
