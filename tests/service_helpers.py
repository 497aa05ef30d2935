"""A fine-tuning service on loopback for tests: a tiny Llama served as `tiny`, owners' keys, one job worker.

    with service(tmp_path) as svc:
        client = OpenAI(base_url=svc.base_url + "/v1", api_key=svc.keys["alice"])
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from serve_runs import running
from tiny import save_tiny_llama

ADMIN_KEY = "admin-key-123456"
QUESTIONS = ["what is the capital of france?", "say hello to the world.", "is the weather okay today?",
             "what does the quick brown fox do?", "do you love this product?", "answer the question briefly."]
ANSWERS = ["paris is the capital of france.", "hello world!", "the weather is okay today, nothing special.",
           "the quick brown fox jumps over the lazy dog.", "i love this product, it is great and wonderful!", "briefly: yes."]
# A job that finishes in seconds on a tiny model: few steps, a checkpoint every 2, a small evaluation.
QUICK = {"train": {"max_steps": 6, "save_every": 2, "eval_every": 3, "batch_size": 4, "sample_prompts": 0, "num_threads": 1},
         "eval": {"max_examples": 4, "bootstrap": 50, "num_samples": 2, "forgetting_data": None, "max_new_tokens": 8}}


def chat_rows(n: int = 48) -> list[dict]:
    return [{"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                          {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]} for i in range(n)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@dataclass
class RunningService:
    base_url: str
    app: object
    keys: dict[str, str]
    root: Path


@contextlib.contextmanager
def service(tmp_path: Path, *, workers: int = 1, owners: tuple[str, ...] = ("alice", "bob"), jobs_db_url: str | None = None):
    from gemcut.service.app import create_service_app
    from gemcut.service.settings import ServiceSettings

    model = save_tiny_llama(tmp_path / "tiny")
    settings = ServiceSettings(models=[str(model)], api_keys=[ADMIN_KEY], service_root=str(tmp_path / "service"),
                               db_url=f"sqlite:///{tmp_path / 'serve.db'}", jobs_db_url=jobs_db_url, workers=workers,
                               job_lease_s=5.0, finetune_models=[], device="cpu", num_threads=1)
    app = create_service_app(settings)
    keys = {owner: app.state.service.keys.create(owner) for owner in owners}
    with running(app) as url:
        yield RunningService(url, app, keys, Path(settings.service_root))


def wait_for(client, job_id: str, statuses: set[str], timeout: float = 180.0):
    """Poll a job until its status is one of `statuses`; fail naming its events when it ends elsewhere."""
    deadline = time.time() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        if job.status in {"succeeded", "failed", "cancelled"} or time.time() > deadline:
            events = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=50).data]
            raise AssertionError(f"{job_id} is {job.status} (error {job.error}), waiting for {statuses}; events: {events}")
        time.sleep(0.5)
