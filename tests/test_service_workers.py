"""Job workers end to end on a tiny random Llama: real `gemcut worker` processes on a real PostgreSQL server
(four jobs, each run exactly once; one worker SIGKILLed mid-job, its job resumed by another with the same
final loss), and an in-process worker on SQLite (cancel, pause then resume, a bad training file). Below them,
the metrics tail and the error line, without processes.

    python -m pytest -q tests/test_service_workers.py
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_jobs import empty_tables, insert_job
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
from tiny import CORPUS, save_tiny_llama

from gemcut.service.db import CheckpointRow, EventRow, FileRow, JobRow, make_engine, utcnow
from gemcut.service.job_folder import job_error
from gemcut.service.job_metrics import MetricsTail
from gemcut.service.layout import ServiceLayout
from gemcut.service.names import fine_tuned_model_name
from gemcut.service.worker import JobWorker

TRAINING_FILE = "file-chats0000001"
STEPS = 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")


def make_layout(root: Path) -> ServiceLayout:
    layout = ServiceLayout(root).ensure()
    rows = [{"messages": [{"role": "user", "content": f"{a} ({i})"}, {"role": "assistant", "content": b}]}
            for i in range(6) for a, b in zip(CORPUS, CORPUS[1:] + CORPUS[:1])]
    layout.file_path(TRAINING_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return layout


def job_config(model_dir: Path, steps: int = STEPS) -> dict:
    """A few dozen quick steps with a checkpoint every 5 and an evaluation that takes seconds."""
    return {"model": {"name": str(model_dir)}, "adapter": {"r": 4, "alpha": 8},
            "data": {"max_length": 64, "split": {"validation": 0.2, "test": 0.2}},
            "train": {"batch_size": 4, "max_steps": steps, "save_every": 5, "eval_every": 20, "precision": "fp32",
                      "lr": 1e-3, "sample_prompts": 0, "report_to": [], "num_threads": 1},
            "eval": {"forgetting_data": None, "compare_base": False, "max_examples": 4, "max_new_tokens": 4,
                     "bootstrap": 0, "num_samples": 0}}


def wait_until(check, timeout: float, what: str, every: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_row(sessions: sessionmaker, job_id: str) -> JobRow:
    with sessions() as s:
        row = s.get(JobRow, job_id)
        s.expunge(row)
        return row


def messages(sessions: sessionmaker, job_id: str) -> list[str]:
    with sessions() as s:
        return list(s.scalars(select(EventRow.message).where(EventRow.job_id == job_id).order_by(EventRow.seq)))


def metrics_steps(sessions: sessionmaker, job_id: str) -> list[int]:
    with sessions() as s:
        return [e["step"] for e in s.scalars(select(EventRow.data).where(EventRow.job_id == job_id, EventRow.type == "metrics")
                                             .order_by(EventRow.seq))]


def final_loss(layout: ServiceLayout, job_id: str) -> float:
    lines = [json.loads(x) for x in (layout.run_dir(job_id) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r][-1]["loss"]


def processes_running(needle: str) -> list[int]:
    """Pids of live processes whose command line holds `needle`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next((ln for ln in (entry / "status").read_text().splitlines() if ln.startswith("State:")), "")
            except OSError:
                continue
            if needle in cmdline and "zombie" not in state:
                found.append(int(entry.name))
    return found


def start_worker(url: str, root: Path, name: str, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "gemcut", "worker", "--jobs-db", url, "--service-root", str(root), "--worker-id", name,
               "--lease", "3", "--poll", "0.5", "--threads", "1"]
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def test_two_workers_on_postgres_run_each_job_once_and_resume_a_killed_workers_job(postgres_url, model_dir, tmp_path):
    engine = make_engine(postgres_url)
    empty_tables(engine)
    sessions = sessionmaker(engine)
    layout = make_layout(tmp_path / "service")
    jobs = [insert_job(sessions, config=job_config(model_dir), training_file=TRAINING_FILE, suffix="pg") for _ in range(4)]
    workers = {name: start_worker(postgres_url, layout.root, name, tmp_path / f"{name}.log") for name in ("A", "B")}
    try:
        # A's job, once its first checkpoint is on disk and before it ends: kill A outright.
        def a_job_with_a_checkpoint():
            with sessions() as s:
                job = s.scalars(select(JobRow).where(JobRow.worker == "A", JobRow.status == "running")).first()
            if job is not None and list((layout.run_dir(job.id) / "checkpoints").glob("step-*/COMPLETE")):
                return job.id
        killed = wait_until(a_job_with_a_checkpoint, 90, "worker A's job to save a checkpoint", every=0.05)
        workers["A"].send_signal(signal.SIGKILL)
        workers["A"].wait()
        assert not (layout.run_dir(killed) / "final").exists(), "the job ended before the kill: make the run longer"
        # Its training process died with it (PR_SET_PDEATHSIG), leaving the run folder to the next worker alone.
        wait_until(lambda: not processes_running(str(layout.run_dir(killed))), 10, "A's training process to die")
        workers["C"] = start_worker(postgres_url, layout.root, "C", tmp_path / "C.log")

        def all_ended():
            with sessions() as s:
                statuses = s.scalars(select(JobRow.status).where(JobRow.id.in_(jobs))).all()
            return all(st not in ("queued", "running") for st in statuses)
        wait_until(all_ended, 240, "the four jobs to end", every=0.5)
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers.values():
            worker.wait(60)
    logs = "\n".join((tmp_path / f"{n}.log").read_text() for n in workers)
    rows = {j: job_row(sessions, j) for j in jobs}
    assert {r.status for r in rows.values()} == {"succeeded"}, ({j: r.error for j, r in rows.items()}, logs)
    for job_id, row in rows.items():
        assert messages(sessions, job_id).count("The job has successfully completed") == 1
        # One metrics event per step, none twice, even for the resumed job.
        assert metrics_steps(sessions, job_id) == list(range(1, STEPS + 1))
        assert row.attempts == (2 if job_id == killed else 1)
        assert row.fine_tuned_model == fine_tuned_model_name(row) and row.fine_tuned_model.startswith("ft:")
        assert row.progress == {"step": STEPS, "total_steps": STEPS} and row.trained_tokens > 0
    resumed = [m for m in messages(sessions, killed) if m.startswith("Resumed from checkpoint step")]
    assert len(resumed) == 1 and resumed[0].endswith("after worker A stopped heartbeating"), messages(sessions, killed)
    assert rows[killed].worker in ("B", "C")
    # The same exact resume as `gemcut train --resume`: the killed job ends with the uninterrupted jobs' loss.
    losses = {j: final_loss(layout, j) for j in jobs}
    assert len(set(losses.values())) == 1, losses
    engine.dispose()


@pytest.fixture
def sqlite_service(tmp_path):
    layout = make_layout(tmp_path / "service")
    engine = make_engine(layout.default_db_url)
    sessions = sessionmaker(engine)
    yield layout, sessions
    engine.dispose()


def test_stop_hand_back_cancel_pause_resume_and_a_bad_file_with_in_process_workers(sqlite_service, model_dir, tmp_path):
    layout, sessions = sqlite_service
    layout.file_path("file-broken000001").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n{"messages": 3}\n')
    long = insert_job(sessions, config=job_config(model_dir, steps=100000), training_file=TRAINING_FILE)
    paused = insert_job(sessions, config=job_config(model_dir, steps=40), training_file=TRAINING_FILE)
    broken = insert_job(sessions, config=job_config(model_dir), training_file="file-broken000001")
    first = JobWorker(sessions, layout, worker_id="first", max_jobs=3, lease_s=5, poll_s=0.25, threads=1).start()
    second = JobWorker(sessions, layout, worker_id="second", max_jobs=2, lease_s=5, poll_s=0.25, threads=1)

    def checkpointed(job_id):
        return lambda: list((layout.run_dir(job_id) / "checkpoints").glob("step-*/COMPLETE"))

    def ended(job_id):
        return lambda: job_row(sessions, job_id).status not in ("queued", "running")

    def checkpoints_listed_as_on_disk(job_id):
        with sessions() as s:
            listed = s.scalars(select(CheckpointRow.folder).where(CheckpointRow.job_id == job_id)).all()
        on_disk = sorted(p.parent.name for p in (layout.run_dir(job_id) / "checkpoints").glob("step-*/COMPLETE"))
        return on_disk and sorted(listed) == on_disk

    try:
        wait_until(checkpointed(paused), 90, "the paused job's first checkpoint")
        with sessions() as s, s.begin():
            s.get(JobRow, paused).requested = "pause"
        wait_until(lambda: job_row(sessions, paused).status == "paused", 20, "the pause")
        wait_until(ended(broken), 60, "the broken job to end")
        wait_until(checkpointed(long), 90, "the long job's first checkpoint")
        # A worker that stops hands its job back at a step boundary: the next worker resumes it at once.
        first.stop(timeout=60)
        row = job_row(sessions, long)
        assert row.status == "running" and row.lease_until <= utcnow() and messages(sessions, long)[-1].startswith("Worker first is stopping")
        assert not processes_running(str(layout.run_dir(long) / "job_config.yaml"))
        second.start()
        wait_until(lambda: any(m.startswith("Resumed from checkpoint step") for m in messages(sessions, long)), 30, "the resume")
        with sessions() as s, s.begin():  # what POST .../resume does
            s.get(JobRow, paused).status = "queued"
        resumed_at = job_row(sessions, long).progress["step"]
        wait_until(lambda: job_row(sessions, long).progress["step"] > resumed_at + 5, 60, "the resumed job's steps")
        with sessions() as s, s.begin():
            s.get(JobRow, long).requested = "cancel"
        asked = time.monotonic()
        wait_until(lambda: job_row(sessions, long).status == "cancelled", 20, "the cancel")
        assert time.monotonic() - asked < 10  # within a few seconds, at a step boundary
        wait_until(ended(paused), 120, "the resumed job to end")
    finally:
        first.stop(timeout=60)
        second.stop(timeout=60)
    assert [m for m in messages(sessions, long) if m.startswith("Resumed")] == [
        f"Resumed from checkpoint step {resumed_at} after worker first stopped heartbeating"]
    assert job_row(sessions, long).finished_at is not None and job_row(sessions, long).worker == "second"
    assert messages(sessions, long)[-1].startswith("Fine-tuning job cancelled; its last checkpoint (step ")
    assert not processes_running(str(layout.run_dir(long) / "job_config.yaml"))
    assert checkpoints_listed_as_on_disk(long) and checkpoints_listed_as_on_disk(paused)
    assert metrics_steps(sessions, long) == list(range(1, job_row(sessions, long).progress["step"] + 1))
    row = job_row(sessions, paused)
    assert row.status == "succeeded", row.error
    assert any(m.startswith("Resumed from checkpoint step") and m.endswith("after pause") for m in messages(sessions, paused))
    assert metrics_steps(sessions, paused) == list(range(1, 41))
    assert row.headline and row.headline["text"]
    with sessions() as s:
        result = s.get(FileRow, row.result_files[0])
        assert (result.purpose, result.status, result.owner) == ("fine-tune-results", "processed", row.owner)
    table = list(csv.DictReader(layout.file_path(result.id).read_text().splitlines()))
    assert [int(r["step"]) for r in table] == list(range(1, 41)) and float(table[-1]["train_loss"]) == final_loss(layout, paused)
    assert table[19]["valid_loss"] and not table[18]["valid_loss"]
    failed = job_row(sessions, broken)
    assert failed.status == "failed" and failed.error["code"] == "invalid_training_file", failed.error
    assert failed.error["param"] == "training_file" and "file-broken000001:2" in failed.error["message"]
    assert str(layout.root) not in failed.error["message"] and "Traceback" not in failed.error["message"]


def test_metrics_tail_merges_validation_and_never_repeats_a_step_after_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"

    def write(*records, mode="a"):
        with path.open(mode) as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))

    tail = MetricsTail(path)
    write({"step": 1, "loss": 2.5, "mean_token_accuracy": 0.1}, {"step": 2, "loss": 2.4})
    assert [e.step for e in tail.read(4)] == [1]  # step 2 is held: a validation line may follow
    write({"step": 2, "split": "validation", "val_loss": 2.6, "val_mean_token_accuracy": 0.2})
    with path.open("a") as f:
        f.write('{"step": 3, "lo')  # a line being written
    (event,) = tail.read(4)
    assert event.message == "Step 2/4: training loss=2.4000, validation loss=2.6000"
    assert event.data == {"step": 2, "train_loss": 2.4, "valid_loss": 2.6, "valid_mean_token_accuracy": 0.2, "total_steps": 4}
    # A resume from step 1 rewrites the file to step 1's lines and retraces step 2.
    write({"step": 1, "loss": 2.5, "mean_token_accuracy": 0.1}, mode="w")
    assert tail.read(4) == []
    write({"step": 2, "loss": 2.4}, {"step": 2, "split": "validation", "val_loss": 2.6}, {"step": 3, "loss": 2.3})
    assert [e.step for e in tail.read(4) + tail.finish()] == [3]
    assert tail.at_or_before(2)["valid_loss"] == 2.6 and tail.at_or_before(10)["step"] == 10
    # A new worker taking the job over starts from the store's last metrics event.
    assert [e.step for e in MetricsTail(path, emitted_through=2).finish()] == [3]


def test_the_error_is_the_runs_own_line_with_file_ids_not_paths(tmp_path):
    layout = ServiceLayout(tmp_path).ensure()
    job = JobRow(id="ftjob-abcdefgh1234", training_file="file-train000001", validation_file=None)
    log = tmp_path / "job.log"
    log.write_text(f"run folder: x\nerror: {layout.file_path('file-train000001')}:7: field \"messages\" missing; found keys: text\n")
    assert job_error(log, layout, job, 2) == {"code": "invalid_training_file", "param": "training_file",
                                              "message": 'file-train000001:7: field "messages" missing; found keys: text'}
    log.write_text("error: the estimate predicts this run will not fit in memory\nLower train.batch_size or data.max_length\n")
    error = job_error(log, layout, job, 2)
    assert (error["code"], error["param"]) == ("training_failed", "train.batch_size") and "\nLower" in error["message"]
    # Only the last attempt's output counts: an earlier attempt's error is not this one's.
    log.write_text("==== train (attempt 1)\nerror: an older failure\n==== train (attempt 2)\n"
                   "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: boom\n")
    assert job_error(log, layout, job, 1)["message"] == "training exited with status 1: RuntimeError: boom"
    log.write_text("error: ../../files/file-train000001:3: not JSON\n")  # the path as the run folder's children see it
    assert job_error(log, layout, job, 2)["message"] == "file-train000001:3: not JSON"
