"""The job queue on SQLite and on a real PostgreSQL server: claim order, one claim per job under concurrent
claimers, takeover of an expired lease, heartbeats, paused jobs, queue positions.

    python -m pytest -q tests/test_service_queue.py
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from service_jobs import empty_tables, insert_job
from sqlalchemy.orm import sessionmaker

from gemcut.service.db import JobRow, make_engine, utcnow
from gemcut.service.queue import claim, heartbeat, queue_position


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'service.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    empty_tables(engine)  # PostgreSQL: one server for the session; every test starts from empty tables
    yield sessionmaker(engine)
    engine.dispose()


def test_claims_the_oldest_queued_job_first(sessions):
    first, second = insert_job(sessions), insert_job(sessions)
    got = claim(sessions, "w1", lease_s=30)
    assert got.job.id == first and got.taken_from is None
    assert (got.job.status, got.job.worker, got.job.attempts) == ("running", "w1", 1)
    assert got.job.started_at is not None and got.job.lease_until > utcnow() + timedelta(seconds=25)
    assert claim(sessions, "w2", lease_s=30).job.id == second
    assert claim(sessions, "w3", lease_s=30) is None


def test_each_job_is_claimed_exactly_once_by_concurrent_claimers(sessions):
    jobs = [insert_job(sessions) for _ in range(24)]
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def claimer(name: str) -> None:
        start.wait()
        while (got := claim(sessions, name, lease_s=60)) is not None:
            with lock:
                claimed.append((got.job.id, name))

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = Counter(job for job, _ in claimed)
    assert sorted(counts) == sorted(jobs) and set(counts.values()) == {1}
    assert len({name for _, name in claimed}) > 1  # the claimers really raced
    with sessions() as s:
        rows = s.query(JobRow).all()
        assert all(r.status == "running" and r.attempts == 1 for r in rows)
        assert {r.id: r.worker for r in rows} == {job: name for job, name in claimed}


def test_an_expired_lease_is_taken_over_and_the_old_worker_told(sessions):
    job = insert_job(sessions)
    assert claim(sessions, "w1", lease_s=0.2).job.id == job
    assert claim(sessions, "w2", lease_s=30) is None  # w1's lease still runs
    time.sleep(0.4)
    got = claim(sessions, "w2", lease_s=30)
    assert got.job.id == job and got.taken_from == "w1" and got.job.attempts == 2 and got.job.worker == "w2"
    beat = heartbeat(sessions, job, "w1", lease_s=30)
    assert not beat.ours  # w1 must stop at once
    assert heartbeat(sessions, job, "w2", lease_s=30).ours


def test_heartbeat_renews_the_lease_and_answers_requests(sessions):
    job = insert_job(sessions)
    claim(sessions, "w1", lease_s=0.3)
    beat = heartbeat(sessions, job, "w1", lease_s=30)
    assert beat.ours and beat.requested is None
    time.sleep(0.4)
    assert claim(sessions, "w2", lease_s=30) is None  # renewed: not taken over
    with sessions() as s, s.begin():
        s.get(JobRow, job).requested = "cancel"
    assert heartbeat(sessions, job, "w1", lease_s=30) == type(beat)(True, "cancel")


def test_paused_jobs_are_not_claimed_until_queued_again(sessions):
    paused = insert_job(sessions, status="paused")
    assert claim(sessions, "w1", lease_s=30) is None
    with sessions() as s, s.begin():
        s.get(JobRow, paused).status = "queued"
    assert claim(sessions, "w1", lease_s=30).job.id == paused


def test_queue_position_counts_queued_jobs_by_seq(sessions):
    a, b, c = insert_job(sessions), insert_job(sessions), insert_job(sessions)
    claim(sessions, "w1", lease_s=30)
    with sessions() as s:
        assert [queue_position(s, s.get(JobRow, j)) for j in (a, b, c)] == [None, 1, 2]
