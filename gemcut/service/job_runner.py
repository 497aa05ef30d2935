"""One claimed job, run to its end by one worker thread: `gemcut train` (resumed from the run's last checkpoint
when there is one), then `gemcut eval`, then the job's result, with its progress, events and checkpoints
written to the job store as it goes.

    python -m pytest -q tests/test_service_workers.py

    JobRunner(claimed, sessions=sessions, layout=layout, worker_id="w1", lease_s=30, poll_s=1,
              threads=None, stopping=threading.Event()).run()

Every `poll_s` the runner renews the job's lease (gemcut/service/queue.py), reads the new lines of
metrics.jsonl into metrics events (gemcut/service/job_metrics.py), keeps `progress` and `estimated_finish`
current, and turns each complete checkpoint folder into a checkpoint row (a folder the run prunes loses its
row: only checkpoints on disk can be served). What the API asks (`requested`): cancel or pause SIGTERMs the
child, which finishes its step, saves a checkpoint and exits; the job is then "cancelled" or "paused". A
worker that is stopping does the same and hands the job back (its lease ends now), so another worker resumes
it. A heartbeat that finds the job taken over kills the child at once: another worker owns the run folder.
Every write checks, in its own transaction, that this worker still holds the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from gemcut.run_folder import checkpoint_step, complete_checkpoints, latest_checkpoint
from gemcut.service.db import CheckpointRow, EventRow, FileRow, JobRow, new_id, utcnow
from gemcut.service.events import add_event
from gemcut.service.job_folder import (
    ATTEMPT_MARK,
    EVAL_LOG,
    JOB_LOG,
    eval_headline,
    job_error,
    keep_metrics_through,
    planned_steps,
    result_csv,
    trained_tokens,
    write_job_config,
)
from gemcut.service.job_metrics import MetricsTail
from gemcut.service.job_process import start_child, wait_for
from gemcut.service.layout import ServiceLayout
from gemcut.service.names import checkpoint_model_name, fine_tuned_model_name
from gemcut.service.queue import Claim, heartbeat

log = logging.getLogger("gemcut.service.worker")

STOP_GRACE_S = 120.0  # after SIGTERM, the child finishes its step and saves; past this it is killed
MAX_ATTEMPTS = 5  # a job whose worker vanished this many times fails instead of taking down the next one
RESULT_FILENAME = "step_metrics.csv"


class JobLost(Exception):
    """Another worker holds the job now (this one's lease ran out), or it is no longer running."""


class JobRunner:
    def __init__(self, claimed: Claim, *, sessions: sessionmaker, layout: ServiceLayout, worker_id: str, lease_s: float,
                 poll_s: float, threads: int | None, stopping: threading.Event):
        self.job, self.taken_from = claimed.job, claimed.taken_from
        self.sessions, self.layout, self.worker_id = sessions, layout, worker_id
        self.lease_s, self.poll_s, self.threads, self.stopping = lease_s, poll_s, threads, stopping
        self.run_dir = layout.run_dir(self.job.id)
        self.tail: MetricsTail | None = None
        self.checkpoints: dict[int, str] = {}  # step -> checkpoint row id, as the store has them
        self.total_steps: int | None = None
        self.progress: dict | None = None

    # ------------------------------------------------------------ the job from claim to end

    def run(self) -> None:
        """Run the job to its end (or until it is lost); never raises."""
        try:
            self._run()
        except JobLost:
            log.warning("job %s: another worker holds it now; stopped here", self.job.id)
        except Exception as e:  # a bug or a store that went away: fail the job rather than hand it on forever
            log.exception("job %s: the worker failed", self.job.id)
            with contextlib.suppress(Exception):
                self._end("failed", error={"code": "worker_error", "param": None,
                                           "message": f"the worker running the job failed: {type(e).__name__}: {e}"})

    def _run(self) -> None:
        job = self.job
        latest = latest_checkpoint(self.run_dir / "checkpoints")
        resume_step = checkpoint_step(latest) if latest is not None else None
        if job.requested in ("cancel", "pause"):  # asked while no worker held it: nothing to stop
            self._stop_as_requested(job.requested, resume_step)
            return
        if job.attempts > MAX_ATTEMPTS:
            self._end("failed", error={"code": "training_failed", "param": None, "message": (
                f"the job was started {job.attempts - 1} times and each time its worker stopped heartbeating before it "
                "ended (a machine running out of memory kills the worker too?); create it again with a smaller "
                "train.batch_size or data.max_length")})
            return
        config_path = write_job_config(job, self.layout, threads=self.threads)
        if resume_step is not None:
            keep_metrics_through(self.run_dir, resume_step)
        self._load_store_state()
        with self._owned() as (session, _row):
            if resume_step is not None:
                why = (f"after worker {self.taken_from} stopped heartbeating" if self.taken_from else "after pause")
                add_event(session, job.id, f"Resumed from checkpoint step {resume_step} {why}",
                          data={"step": resume_step, "worker": self.worker_id})
            elif self.taken_from:
                add_event(session, job.id, f"Worker {self.taken_from} stopped heartbeating before the first checkpoint; "
                                           f"starting again on worker {self.worker_id}", level="warn")
            else:
                add_event(session, job.id, "Fine-tuning job started", data={"worker": self.worker_id})
        train = [sys.executable, "-m", "gemcut", "train", str(config_path)] + (["--resume"] if resume_step is not None else [])
        ended, code = self._supervise(train, JOB_LOG, training=True)
        if self._ended_early(ended):
            return
        if code != 0:
            self._end("failed", error=job_error(self.run_dir / JOB_LOG, self.layout, job, code))
            return
        ended, code = self._supervise(self._eval_command(), EVAL_LOG, training=False)
        if self._ended_early(ended):
            return
        headline = eval_headline(self.run_dir) if code == 0 else None
        with self._owned() as (session, row):
            if headline is not None:
                row.headline = headline
                add_event(session, job.id, f"Evaluation on the {headline['split']} split: {headline['text']}",
                          data={"headline": headline})
            else:
                error = job_error(self.run_dir / EVAL_LOG, self.layout, job, code)["message"]
                add_event(session, job.id, f"Evaluation failed (the model is ready all the same): {error}", level="warn")
        self._succeed()

    def _ended_early(self, ended: str) -> bool:
        """Handle a child that stopped because it was asked to; True when the job's run is over here."""
        if ended == "exited":
            return False
        step = self._latest_step()
        if ended in ("cancel", "pause"):
            self._stop_as_requested(ended, step)
        elif ended == "stop":
            with self._owned() as (session, row):
                row.lease_until = utcnow()  # another worker may take it at once
                add_event(session, self.job.id, f"Worker {self.worker_id} is stopping; another worker will resume the job"
                          + (f" from checkpoint step {step}" if step is not None else ""), level="warn")
        return True

    def _eval_command(self) -> list[str]:
        overrides = (self.job.gemcut or {}).get("eval") or {}
        if isinstance(overrides, dict):
            overrides = [f"eval.{key}={json.dumps(value)}" for key, value in overrides.items()]
        return [sys.executable, "-m", "gemcut", "eval", str(self.run_dir), *[str(o) for o in overrides]]

    # ------------------------------------------------------------ the child, watched

    def _supervise(self, command: list[str], log_name: str, *, training: bool) -> tuple[str, int | None]:
        """Run `command` to its end while heartbeating: ("exited", status), or how it was stopped early: "cancel",
        "pause" (the API asked) or "stop" (this worker is stopping). Raises JobLost, the child killed."""
        env = {"PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(self.threads)} if self.threads else {})}
        with (self.run_dir / log_name).open("a", encoding="utf-8") as out:
            out.write(f"{ATTEMPT_MARK}{shlex.join(command[1:])} (attempt {self.job.attempts}, worker {self.worker_id}, "
                      f"{utcnow():%Y-%m-%d %H:%M:%S} UTC)\n")
        child = start_child(command, log=self.run_dir / log_name, env=env, cwd=self.run_dir)
        asked, asked_at = None, 0.0
        try:
            while True:
                code = wait_for(child, self.poll_s)
                try:
                    beat = heartbeat(self.sessions, self.job.id, self.worker_id, self.lease_s)
                except Exception as e:  # the store is unreachable for now: keep going, the lease has slack
                    log.warning("job %s: heartbeat failed (%s); retrying", self.job.id, e)
                    time.sleep(self.poll_s)
                    continue
                if not beat.ours:
                    raise JobLost(self.job.id)
                if training:
                    self._sync(final=code is not None)
                if code is not None:
                    return (asked or "exited"), code
                if asked is None:
                    asked = beat.requested if beat.requested in ("cancel", "pause") else ("stop" if self.stopping.is_set() else None)
                    if asked is not None:
                        child.send_signal(signal.SIGTERM)  # gemcut finishes the step, saves a checkpoint, exits 143
                        asked_at = time.monotonic()
                elif time.monotonic() - asked_at > STOP_GRACE_S:
                    child.kill()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()

    # ------------------------------------------------------------ the store

    @contextlib.contextmanager
    def _owned(self):
        """A transaction on the job's row, locked where the database can (PostgreSQL), while this worker holds it."""
        with self.sessions() as session, session.begin():
            row = session.scalars(select(JobRow).where(JobRow.id == self.job.id).with_for_update()).first()
            if row is None or row.worker != self.worker_id or row.status != "running":
                raise JobLost(self.job.id)
            yield session, row

    def _load_store_state(self) -> None:
        """What the store already holds of this run: its last metrics event's step and its checkpoint rows."""
        with self.sessions() as session:
            data = session.scalar(select(EventRow.data).where(EventRow.job_id == self.job.id, EventRow.type == "metrics")
                                  .order_by(EventRow.seq.desc()).limit(1))
            self.checkpoints = dict(session.execute(select(CheckpointRow.step, CheckpointRow.id)
                                                    .where(CheckpointRow.job_id == self.job.id)).all())
        self.tail = MetricsTail(self.run_dir / "metrics.jsonl", emitted_through=int((data or {}).get("step") or 0))

    def _sync(self, *, final: bool) -> None:
        """Write what the run folder shows that the store does not have yet: metrics events, progress, checkpoints."""
        # Checkpoints first: a checkpoint complete now had its step's metrics written before, so the read below has them.
        on_disk = {checkpoint_step(p): p.name for p in complete_checkpoints(self.run_dir / "checkpoints")}
        if self.total_steps is None:
            self.total_steps = planned_steps(self.job.config, self.run_dir)
        events = self.tail.read(self.total_steps) + (self.tail.finish() if final else [])
        last = self.tail.last
        progress = {"step": last["step"], "total_steps": self.total_steps} if last else None
        added = sorted(set(on_disk) - set(self.checkpoints))
        gone = sorted(set(self.checkpoints) - set(on_disk))
        if not (events or added or gone or progress != self.progress):
            return
        with self._owned() as (session, row):
            for event in events:
                add_event(session, self.job.id, event.message, level=event.level, type=event.type, data=event.data or None)
            if progress is not None:
                row.progress = progress
                if self.total_steps and last.get("elapsed_s") and last["step"]:
                    left = last["elapsed_s"] / last["step"] * max(self.total_steps - last["step"], 0)
                    row.estimated_finish = utcnow() + timedelta(seconds=left)
            if gone:
                session.execute(delete(CheckpointRow).where(CheckpointRow.id.in_([self.checkpoints[s] for s in gone])))
                session.flush()  # before a new row takes a pruned one's name
            for step in added:
                row_id = new_id("ftckpt")
                session.add(CheckpointRow(id=row_id, job_id=self.job.id, owner=self.job.owner, step=step,
                                          name=checkpoint_model_name(self.job, step), folder=on_disk[step],
                                          metrics=self.tail.at_or_before(step)))
                add_event(session, self.job.id, f"Checkpoint created at step {step}", data={"step": step})
                self.checkpoints[step] = row_id
        for step in gone:
            self.checkpoints.pop(step, None)
        self.progress = progress

    def _latest_step(self) -> int | None:
        latest = latest_checkpoint(self.run_dir / "checkpoints")
        return checkpoint_step(latest) if latest is not None else None

    def _stop_as_requested(self, requested: str, step: int | None) -> None:
        kept = f"; its last checkpoint (step {step}) is kept" if step is not None else ""
        if requested == "cancel":
            self._end("cancelled", message="Fine-tuning job cancelled" + kept)
        else:
            self._end("paused", message="Fine-tuning job paused" + (f" at checkpoint step {step}" if step is not None else ""))

    def _end(self, status: str, *, message: str | None = None, error: dict | None = None) -> None:
        """Leave the job in `status` (failed, cancelled, paused), releasing it."""
        with self._owned() as (session, row):
            row.status, row.requested, row.lease_until, row.estimated_finish = status, None, None, None
            if status == "paused":
                row.worker = None
            else:
                row.finished_at = utcnow()
            if error is not None:
                row.error = error
                add_event(session, self.job.id, error["message"], level="error")
            if message is not None:
                add_event(session, self.job.id, message)

    def _succeed(self) -> None:
        """Store the result file, name the model, and mark the job succeeded."""
        file_id = new_id("file")
        data = result_csv(self.run_dir)
        path = self.layout.file_path(file_id)
        path.write_bytes(data)
        try:
            with self._owned() as (session, row):
                session.add(FileRow(id=file_id, owner=row.owner, filename=RESULT_FILENAME, purpose="fine-tune-results",
                                    bytes=len(data), status="processed", storage=file_id))
                row.result_files = [*(row.result_files or []), file_id]
                row.trained_tokens = trained_tokens(self.run_dir)
                row.fine_tuned_model = fine_tuned_model_name(row)
                row.status, row.requested, row.lease_until, row.estimated_finish = "succeeded", None, None, None
                row.finished_at = utcnow()
                add_event(session, self.job.id, f"New fine-tuned model created: {row.fine_tuned_model}")
                add_event(session, self.job.id, "The job has successfully completed")
        except BaseException:
            Path(path).unlink(missing_ok=True)
            raise
