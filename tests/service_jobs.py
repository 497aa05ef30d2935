"""Jobs put straight into the service's tables, below the API, for the queue and worker tests.

    python -m pytest -q tests/test_service_queue.py tests/test_service_workers.py
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from gemcut.service.db import JobRow, new_id


def insert_job(sessions: sessionmaker, *, config: dict | None = None, status: str = "queued", owner: str = "alice",
               model: str = "tiny", training_file: str = "file-training0001", validation_file: str | None = None,
               suffix: str | None = None, **fields) -> str:
    """A job row as the API would create it (the next `seq`); returns its id."""
    with sessions() as session, session.begin():
        seq = (session.scalar(select(func.max(JobRow.seq))) or 0) + 1
        job_id = new_id("ftjob")
        session.add(JobRow(id=job_id, seq=seq, owner=owner, model=model, training_file=training_file,
                           validation_file=validation_file, suffix=suffix, seed=0, method={"type": "supervised"},
                           hyperparameters={}, config=config or {}, status=status, run_dir=f"runs/{job_id}",
                           result_files=[], attempts=0, **fields))
    return job_id


def empty_tables(engine) -> None:
    """Delete every row of the service's tables (a PostgreSQL server is shared by the whole test session)."""
    from gemcut.service.db import Base

    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
