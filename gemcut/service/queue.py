"""The job queue: workers claim queued jobs under a lease, renew it by heartbeat, and take over the jobs of
workers whose lease ran out.

    python -m pytest -q tests/test_service_queue.py

    claimed = claim(sessions, "worker-a", lease_s=30)    # Claim(job, taken_from) or None
    beat = heartbeat(sessions, claimed.job.id, "worker-a", lease_s=30)
    if not beat.ours: stop at once                         # another worker holds the job now
    if beat.requested == "cancel": ...

A job is claimable when it is "queued", or "running" with a lease in the past (its worker died or hung).
The oldest claimable job (by `seq`) goes first. Claiming is atomic on both databases: PostgreSQL locks the
row with `SELECT ... FOR UPDATE SKIP LOCKED` (claimers skip each other's rows instead of waiting); SQLite,
which has no row locks, runs one conditional `UPDATE ... WHERE id=? AND <still claimable>` per candidate
and keeps the one whose row count is 1 (the statement is atomic, so two claimers never both win).
"paused" jobs are not claimable until the API sets them back to "queued".

`sessions` is a SQLAlchemy sessionmaker over `gemcut.service.db.make_engine(url)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from gemcut.service.db import JobRow, utcnow

CANDIDATES = 8  # SQLite: rows tried per claim before looking again (each lost race moves on to the next)


@dataclass
class Claim:
    """A job this worker now holds (detached from its session: read its fields freely), and, when it was taken
    over from a worker whose lease ran out, that worker's id."""

    job: JobRow
    taken_from: str | None = None


@dataclass
class Heartbeat:
    """`ours`: the lease was renewed (False: another worker holds the job, or it is no longer running: stop at
    once). `requested`: what the API asked of the job ("cancel", "pause" or None)."""

    ours: bool
    requested: str | None


def claimable(now: datetime):
    """The SQL condition of a job a worker may take at `now`."""
    return or_(JobRow.status == "queued", and_(JobRow.status == "running", JobRow.lease_until < now))


def claim(sessions: sessionmaker, worker_id: str, lease_s: float) -> Claim | None:
    """Take the oldest claimable job for `worker_id` for `lease_s` seconds: status "running", the worker, the
    lease, attempts + 1, started_at the first time. None when no job is claimable."""
    with sessions() as session:
        if session.get_bind().dialect.name == "postgresql":
            return _claim_locked(session, worker_id, lease_s)
        return _claim_conditional(session, worker_id, lease_s)


def _claim_locked(session: Session, worker_id: str, lease_s: float) -> Claim | None:
    """PostgreSQL: lock the oldest claimable row, skipping rows other claimers hold locked."""
    with session.begin():
        now = utcnow()
        job = session.scalars(select(JobRow).where(claimable(now)).order_by(JobRow.seq).limit(1)
                              .with_for_update(skip_locked=True)).first()
        if job is None:
            return None
        taken_from = job.worker if job.status == "running" else None
        job.status, job.worker, job.lease_until = "running", worker_id, now + timedelta(seconds=lease_s)
        job.attempts = (job.attempts or 0) + 1
        job.started_at = job.started_at or now
    return _detached(session, job, taken_from)


def _claim_conditional(session: Session, worker_id: str, lease_s: float) -> Claim | None:
    """SQLite: one conditional UPDATE per candidate, the first that changes a row wins."""
    while True:
        now = utcnow()
        candidates = session.execute(select(JobRow.id, JobRow.status, JobRow.worker).where(claimable(now))
                                     .order_by(JobRow.seq).limit(CANDIDATES)).all()
        session.rollback()  # end the read before writing: the UPDATE starts a transaction of its own
        if not candidates:
            return None
        for job_id, status, previous in candidates:
            changed = session.execute(
                update(JobRow).where(JobRow.id == job_id, claimable(now))
                .values(status="running", worker=worker_id, lease_until=now + timedelta(seconds=lease_s),
                        attempts=JobRow.attempts + 1, started_at=func.coalesce(JobRow.started_at, now))
                .execution_options(synchronize_session=False)).rowcount
            session.commit()
            if changed == 1:
                job = session.get(JobRow, job_id)
                # Lost races do not matter; a job taken over was "running" when read, and the UPDATE proved its lease
                # had run out, so `previous` is the worker that lost it.
                return _detached(session, job, previous if status == "running" else None)


def _detached(session: Session, job: JobRow, taken_from: str | None) -> Claim:
    session.refresh(job)
    session.expunge(job)
    return Claim(job, taken_from)


def heartbeat(sessions: sessionmaker, job_id: str, worker_id: str, lease_s: float) -> Heartbeat:
    """Renew the lease of `job_id` for another `lease_s` seconds if `worker_id` still holds it (running, and no
    other worker took it over); answer what the API has requested of the job."""
    with sessions() as session, session.begin():
        renewed = session.execute(
            update(JobRow).where(JobRow.id == job_id, JobRow.worker == worker_id, JobRow.status == "running")
            .values(lease_until=utcnow() + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)).rowcount
        requested = session.scalar(select(JobRow.requested).where(JobRow.id == job_id))
    return Heartbeat(renewed == 1, requested)


def queue_position(session: Session, job: JobRow) -> int | None:
    """The 1-based place of a queued job among the queued jobs (by `seq`); None when it is not queued."""
    if job.status != "queued":
        return None
    return session.scalar(select(func.count()).select_from(JobRow)
                          .where(JobRow.status == "queued", JobRow.seq <= job.seq))
