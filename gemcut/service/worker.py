"""A worker: claims queued fine-tuning jobs from the job store and runs each as an ordinary gemcut run folder.

    gemcut worker --db postgresql+psycopg://gemcut@db-host/gemcut --root /shared/gemcut-service
    python -m pytest -q tests/test_service_workers.py

    worker = JobWorker("sqlite:///service.db", ServiceLayout(root))
    worker.start()   # a background thread (what `gemcut serve` runs in-process)
    worker.stop()    # running jobs stop at a step boundary and are handed back to the queue
    worker.run_forever()   # in this thread, until `request_stop()` (what `gemcut worker` runs)

Each claimed job gets a thread of its own (gemcut/service/job_runner.py) that runs `gemcut train` and
`gemcut eval` as child processes in `layout.run_dir(job.id)`, renews the job's lease, and writes its progress.
At most `max_jobs` jobs run at once (default 1: a CPU has room for one training run). Several workers, on
one machine or several sharing one PostgreSQL and one service folder, never run the same job twice: claims
are atomic (gemcut/service/queue.py), and a worker that stops heartbeating loses its jobs to the others
once `lease_s` has passed; they resume them from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading

from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from gemcut.service.db import make_engine
from gemcut.service.job_runner import JobRunner
from gemcut.service.layout import ServiceLayout
from gemcut.service.queue import claim

log = logging.getLogger("gemcut.service.worker")


def default_worker_id() -> str:
    """`<host>-<pid>-<random>`: unique among workers, and says where a job ran."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def session_factory(db: str | Engine | sessionmaker) -> sessionmaker:
    """A sessionmaker for a database URL (tables created), an engine, or a sessionmaker as it is."""
    if isinstance(db, sessionmaker):
        return db
    return sessionmaker(make_engine(db) if isinstance(db, str) else db)


class JobWorker:
    def __init__(self, db: str | Engine | sessionmaker, layout: ServiceLayout, *, worker_id: str | None = None,
                 max_jobs: int = 1, lease_s: float = 30.0, poll_s: float = 1.0, threads: int | None = None):
        """`db`: the job store (a URL, engine or sessionmaker); `layout`: the service folder every worker shares;
        `lease_s`: how long a job stays this worker's without a heartbeat (every `poll_s`); `threads`: torch CPU
        threads of each job (train.num_threads, unless the job's config sets it)."""
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be at least 1, got {max_jobs}")
        if poll_s * 3 > lease_s:
            raise ValueError(f"lease_s={lease_s} leaves no slack for heartbeats every poll_s={poll_s}; make lease_s at least "
                             "3 x poll_s")
        self.sessions = session_factory(db)
        self.layout = layout
        self.worker_id = worker_id or default_worker_id()
        self.max_jobs, self.lease_s, self.poll_s, self.threads = max_jobs, lease_s, poll_s, threads
        self.stopping = threading.Event()
        self.running: dict[str, threading.Thread] = {}  # job id -> its runner thread
        self._thread: threading.Thread | None = None

    def run_forever(self) -> None:
        """Claim and run jobs until `request_stop()`; then stop the running jobs (each saves a checkpoint and is
        handed back to the queue) and return."""
        self.layout.ensure()
        log.info("worker %s: watching for jobs (at most %d at once)", self.worker_id, self.max_jobs)
        while not self.stopping.is_set():
            self.running = {job: t for job, t in self.running.items() if t.is_alive()}
            if len(self.running) < self.max_jobs and self._claim_one():
                continue  # there may be more to claim
            self.stopping.wait(self.poll_s)
        for thread in list(self.running.values()):
            thread.join()
        log.info("worker %s: stopped", self.worker_id)

    def _claim_one(self) -> bool:
        try:
            claimed = claim(self.sessions, self.worker_id, self.lease_s)
        except Exception as e:  # the store is unreachable for now: try again at the next poll
            log.warning("worker %s: could not claim a job (%s)", self.worker_id, e)
            return False
        if claimed is None:
            return False
        runner = JobRunner(claimed, sessions=self.sessions, layout=self.layout, worker_id=self.worker_id,
                           lease_s=self.lease_s, poll_s=self.poll_s, threads=self.threads, stopping=self.stopping)
        # The runner thread starts the job's child processes and waits for them: they die with it (job_process.py).
        thread = threading.Thread(target=runner.run, name=f"job-{claimed.job.id}", daemon=True)
        thread.start()
        self.running[claimed.job.id] = thread
        log.info("worker %s: running %s (attempt %d)", self.worker_id, claimed.job.id, claimed.job.attempts)
        return True

    def request_stop(self) -> None:
        """Ask `run_forever` to stop (safe from a signal handler)."""
        self.stopping.set()

    def start(self) -> JobWorker:
        """Run `run_forever` in a background thread."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self.stopping.clear()
        self._thread = threading.Thread(target=self.run_forever, name=f"worker-{self.worker_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background thread: running jobs stop at a step boundary, save, and go back to the queue."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
