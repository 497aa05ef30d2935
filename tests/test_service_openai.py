"""The fine-tuning flow with the official openai client against a real uvicorn server on loopback.

    python -m pytest -q tests/test_service_openai.py

Upload (and a bad file naming its line), create, poll to succeeded, events page by page, checkpoints, chat
with the fine-tuned model and with a checkpoint, the results CSV, cancel, pause and resume, another owner's
key getting 404 for everything of alice's, and a bad request naming its parameter. One in-process worker
runs the jobs one after another on a tiny random Llama.
"""

from __future__ import annotations

import csv
import io
import json
import time

import pytest
from service_helpers import QUICK, chat_rows, service, wait_for, write_jsonl

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    with service(tmp_path_factory.mktemp("svc")) as running:
        yield running


def client_for(svc, owner: str):
    return openai.OpenAI(base_url=svc.base_url + "/v1", api_key=svc.keys[owner], max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def training_file(svc, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", chat_rows())
    alice = client_for(svc, "alice")
    uploaded = alice.files.create(file=path.open("rb"), purpose="fine-tune")
    return alice.files.wait_for_processing(uploaded.id, poll_interval=0.2, max_wait_seconds=60)


def test_upload_is_checked_by_the_data_pipeline(svc, training_file, tmp_path):
    alice = client_for(svc, "alice")
    assert training_file.status == "processed" and training_file.filename == "train.jsonl"
    assert alice.files.content(training_file.id).read() == (write_jsonl(tmp_path / "same.jsonl", chat_rows())).read_bytes()
    rows = chat_rows(4) + ['{"messages": [{"role": "robot", "content": "hi"}]}']
    bad = alice.files.wait_for_processing(alice.files.create(file=("bad.jsonl", write_jsonl(tmp_path / "bad.jsonl", rows).read_bytes()),
                                                             purpose="fine-tune").id, poll_interval=0.2, max_wait_seconds=60)
    assert bad.status == "error"
    assert "line 5" in bad.status_details and "role" in bad.status_details, bad.status_details
    with pytest.raises(openai.BadRequestError) as refused:
        alice.fine_tuning.jobs.create(model="tiny", training_file=bad.id)
    assert refused.value.body["param"] == "training_file"
    listed = [f.id for f in alice.files.list(purpose="fine-tune")]
    assert training_file.id in listed and bad.id in listed
    assert alice.files.delete(bad.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(bad.id)


def test_a_job_runs_to_a_served_model(svc, training_file):
    alice = client_for(svc, "alice")
    job = alice.fine_tuning.jobs.create(model="tiny", training_file=training_file.id, suffix="greeter", seed=7,
                                        metadata={"team": "support"},
                                        method={"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 2.0}}},
                                        extra_body={"gemcut": QUICK})
    assert job.status in ("queued", "running") and job.model == "tiny" and job.seed == 7
    done = wait_for(alice, job.id, {"succeeded"})
    assert done.fine_tuned_model == f"ft:tiny:alice:greeter:{job.id.removeprefix('ftjob-')}"
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at >= done.created_at

    # Events, newest first, page by page with `after`, the same as one big page.
    everything = alice.fine_tuning.jobs.list_events(job.id, limit=1000).data
    paged, page = [], alice.fine_tuning.jobs.list_events(job.id, limit=3)
    while True:
        paged += page.data
        if not page.has_more:
            break
        page = alice.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id)
    assert [e.id for e in paged] == [e.id for e in everything] and len(everything) > 3
    metrics = [e.data for e in everything if e.type == "metrics"]
    assert sorted(m["step"] for m in metrics if "train_loss" in m) == list(range(1, 7))
    assert all(0.0 <= m["train_mean_token_accuracy"] <= 1.0 for m in metrics if "train_loss" in m)
    assert any("valid_loss" in m for m in metrics)
    messages = [e.message for e in everything]
    assert messages[0] == "The job has successfully completed" and any(m.startswith("Evaluation") for m in messages), messages

    # Checkpoints, each servable by name; the model itself too.
    checkpoints = alice.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and all(c.fine_tuned_model_checkpoint.startswith(done.fine_tuned_model + ":ckpt-step-") for c in checkpoints)
    for name in (done.fine_tuned_model, checkpoints[0].fine_tuned_model_checkpoint):
        answer = alice.chat.completions.create(model=name, messages=[{"role": "user", "content": "say hello to the world."}], max_tokens=5)
        assert answer.model == name and answer.choices[0].message.content is not None
    assert done.fine_tuned_model in [m.id for m in alice.models.list()]

    # The results file: a CSV of per-step metrics.
    (results_id,) = done.result_files
    assert alice.files.retrieve(results_id).purpose == "fine-tune-results"
    table = list(csv.DictReader(io.StringIO(alice.files.content(results_id).text)))
    assert [int(r["step"]) for r in table] == list(range(1, 7)) and float(table[0]["train_loss"]) > 0

    listed = alice.fine_tuning.jobs.list(limit=10, extra_query={"metadata[team]": "support"}).data
    assert job.id in [j.id for j in listed]
    assert alice.fine_tuning.jobs.list(extra_query={"metadata[team]": "sales"}).data == []


def test_another_owner_sees_nothing_of_alices(svc, training_file):
    alice, bob = client_for(svc, "alice"), client_for(svc, "bob")
    finished = [j for j in alice.fine_tuning.jobs.list(limit=100).data if j.status == "succeeded"]
    if not finished:
        pytest.skip("needs the job of test_a_job_runs_to_a_served_model")
    job = finished[0]
    for call in (lambda: bob.fine_tuning.jobs.retrieve(job.id), lambda: bob.fine_tuning.jobs.list_events(job.id),
                 lambda: bob.fine_tuning.jobs.cancel(job.id), lambda: bob.files.retrieve(training_file.id),
                 lambda: bob.files.content(training_file.id),
                 lambda: bob.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])):
        with pytest.raises(openai.NotFoundError):
            call()
    assert job.id not in [j.id for j in bob.fine_tuning.jobs.list().data]
    assert job.fine_tuned_model not in [m.id for m in bob.models.list()]
    assert training_file.id not in [f.id for f in bob.files.list()]
    with pytest.raises(openai.NotFoundError):  # nor can bob train on alice's file: for him it does not exist
        bob.fine_tuning.jobs.create(model="tiny", training_file=training_file.id)


def test_bad_requests_name_their_parameter(svc, training_file):
    alice = client_for(svc, "alice")
    cases = [({"model": "../../etc"}, "model"),
             ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "many"}}}},
              "method.supervised.hyperparameters.n_epochs"),
             ({"suffix": "x" * 80}, "suffix")]
    for change, param in cases:
        body = {"model": "tiny", "training_file": training_file.id, **change}
        with pytest.raises(openai.BadRequestError) as refused:
            alice.fine_tuning.jobs.create(**body)
        assert refused.value.body["param"] == param, refused.value.body
    with pytest.raises(openai.BadRequestError) as refused:
        alice.fine_tuning.jobs.create(model="tiny", training_file=training_file.id, extra_body={"gemcut": {"output": {"dir": "/tmp"}}})
    assert "output" in refused.value.body["message"]


def _long_job(alice, training_file, steps: int = 400):
    overrides = json.loads(json.dumps(QUICK))
    overrides["train"].update(max_steps=steps, eval_every=None, save_every=3)
    return alice.fine_tuning.jobs.create(model="tiny", training_file=training_file.id, extra_body={"gemcut": overrides})


def _wait_for_checkpoint(svc, job_id: str, timeout: float = 120.0) -> None:
    folder = svc.root / "runs" / job_id / "checkpoints"
    deadline = time.time() + timeout
    while not (folder.is_dir() and any(p.name.startswith("step-") for p in folder.iterdir())):
        assert time.time() < deadline, f"{job_id} made no checkpoint in {timeout} s"
        time.sleep(0.3)


def test_cancel_stops_a_running_job_and_keeps_its_checkpoint(svc, training_file):
    alice = client_for(svc, "alice")
    job = _long_job(alice, training_file)
    wait_for(alice, job.id, {"running"})
    _wait_for_checkpoint(svc, job.id)
    asked = time.time()
    alice.fine_tuning.jobs.cancel(job.id)
    cancelled = wait_for(alice, job.id, {"cancelled"}, timeout=60)
    assert time.time() - asked < 30 and cancelled.finished_at is not None
    assert any(p.name.startswith("step-") for p in (svc.root / "runs" / job.id / "checkpoints").iterdir())
    with pytest.raises(openai.BadRequestError):
        alice.fine_tuning.jobs.resume(job.id)


def test_pause_and_resume_continue_from_the_checkpoint(svc, training_file):
    alice = client_for(svc, "alice")
    steps = 300  # long enough that the pause lands mid-run on a fast machine too (a tiny step is milliseconds)
    job = _long_job(alice, training_file, steps=steps)
    wait_for(alice, job.id, {"running"})
    _wait_for_checkpoint(svc, job.id)
    alice.fine_tuning.jobs.pause(job.id)
    paused = wait_for(alice, job.id, {"paused"}, timeout=60)
    step_at_pause = (paused.model_extra.get("gemcut") or {}).get("progress", {}).get("step", 0)
    assert alice.fine_tuning.jobs.resume(job.id).status in ("queued", "running")
    done = wait_for(alice, job.id, {"succeeded"})
    messages = [e.message for e in alice.fine_tuning.jobs.list_events(job.id, limit=1000).data]
    assert any(m.startswith("Resumed from checkpoint step") for m in messages), messages
    reported = [e.data["step"] for e in alice.fine_tuning.jobs.list_events(job.id, limit=1000).data
                if e.type == "metrics" and "train_loss" in e.data]
    assert sorted(reported) == list(range(1, steps + 1)), "each step reported once across the pause"
    assert done.fine_tuned_model and step_at_pause < steps
