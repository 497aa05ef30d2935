"""`gemcut worker`: claim fine-tuning jobs from the service's job store and run them, until Ctrl-C or SIGTERM.

    gemcut worker                                              # the default service folder and its SQLite store
    gemcut worker --jobs-db postgresql+psycopg://gemcut@db-host/gemcut --service-root /shared/gemcut-service --max-jobs 2

Several workers (on this machine or others sharing one PostgreSQL and one --service-root) split the queue between
them; a worker that dies loses its jobs to the others after --lease seconds, and they resume them from the
last checkpoint. Ctrl-C or SIGTERM stops the running jobs at a step boundary (each saves a checkpoint) and
hands them back to the queue.
"""

from __future__ import annotations

import signal
from pathlib import Path

import typer

from gemcut.cli import app


@app.command("worker")
def worker(
    db: str | None = typer.Option(None, "--jobs-db", help="SQLAlchemy URL of the job store (default: sqlite under --service-root; teams: postgresql+psycopg://...)."),
    root: Path | None = typer.Option(None, "--service-root", help="The service folder every worker and the server share (uploaded files, run folders); default ~/.cache/gemcut/service."),
    max_jobs: int = typer.Option(1, "--max-jobs", min=1, help="Jobs run at once by this worker."),
    lease: float = typer.Option(30.0, "--lease", min=1.0, help="Seconds a job stays this worker's without a heartbeat before another worker may take it over."),
    poll: float = typer.Option(1.0, "--poll", min=0.05, help="Seconds between heartbeats and looks at the queue."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads of each job (unless its config sets train.num_threads)."),
    worker_id: str | None = typer.Option(None, "--worker-id", help="This worker's name in the jobs' events (default host-pid-random)."),
) -> None:
    """Run fine-tuning jobs from the service's queue (see `gemcut serve` and docs/service.md)."""
    from gemcut.service.layout import ServiceLayout, default_root
    from gemcut.service.worker import JobWorker

    layout = ServiceLayout(root or default_root()).ensure()
    job_worker = JobWorker(db or layout.default_db_url, layout, worker_id=worker_id, max_jobs=max_jobs, lease_s=lease,
                           poll_s=poll, threads=threads)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: job_worker.request_stop())
    typer.echo(f"worker {job_worker.worker_id}: jobs from {_shown(db or layout.default_db_url)}, run folders in {layout.runs_dir}")
    job_worker.run_forever()


def _shown(url: str) -> str:
    """The URL without its password (`postgresql+psycopg://user:***@host/db`)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
